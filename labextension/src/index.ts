import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, InputDialog } from '@jupyterlab/apputils';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';

import { MlxModel } from './model';
import { MlxSidebar, MlxStatusItem } from './sidebar';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161"><rect x="3" y="4" width="18" height="4" rx="1"/><rect x="3" y="10" width="18" height="4" rx="1"/><rect x="3" y="16" width="11" height="4" rx="1"/></g></svg>`;

export const mlxIcon = new LabIcon({ name: 'mlx-jupyter:models', svgstr: ICON_SVG });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'mlx-jupyter:sidebar',
  description: 'The shared MLX models of this Jupyter server: memory, models, queue, recent requests.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, IStatusBar],
  activate: (app: JupyterFrontEnd, shell: ILabShell, palette: ICommandPalette | null, statusBar: IStatusBar | null) => {
    const model = new MlxModel();
    const sidebar = new MlxSidebar(model);
    sidebar.title.icon = mlxIcon;
    sidebar.title.caption = 'MLX models';
    shell.add(sidebar, 'left', { rank: 600 });

    if (statusBar) {
      statusBar.registerStatusItem('mlx-jupyter:status', {
        item: new MlxStatusItem(model),
        align: 'left',
        rank: 4
      });
    }

    const pick = async (action: 'load' | 'unload', name?: string) => {
      if (name) {
        return name;
      }
      const names = model.models
        .filter(m => (action === 'load') !== (m.status === 'loaded'))
        .map(m => m.name);
      if (!names.length) {
        model.actionError = `${action}: no model to ${action}`;
        return null;
      }
      const choice = await InputDialog.getItem({ title: `${action === 'load' ? 'Load' : 'Unload'} an MLX model`, items: names });
      return choice.button.accept ? choice.value : null;
    };
    for (const action of ['load', 'unload'] as const) {
      const command = `mlx-jupyter:${action}`;
      app.commands.addCommand(command, {
        label: args => (args.name ? `${action === 'load' ? 'Load' : 'Unload'} MLX model ${args.name}` : `${action === 'load' ? 'Load' : 'Unload'} an MLX model…`),
        execute: async args => {
          const name = await pick(action, args.name as string | undefined);
          if (name) {
            await model.act(name, action);
          }
        }
      });
      palette?.addItem({ command, category: 'MLX' });
    }
  }
};

export default plugin;
