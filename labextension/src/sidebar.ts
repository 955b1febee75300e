// The left panel: memory gauge, models with their buttons, the queue, recent requests.
import { Widget } from '@lumino/widgets';

import { HistoryRow, Model } from './api';
import { MlxModel } from './model';

type Child = Node | string | null | undefined | false;

/** A DOM element with attributes and children (strings become text, never HTML). */
function h(tag: string, attributes: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    element.setAttribute(name, value);
  }
  for (const child of children) {
    if (child) {
      element.append(child);
    }
  }
  return element;
}

function gigabytes(bytes: number | null | undefined): string {
  return typeof bytes === 'number' ? `${(bytes / 1024 ** 3).toFixed(2)} GB` : '—';
}

function ago(iso: string | null): string {
  if (!iso) {
    return 'never';
  }
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) {
    return `${Math.round(seconds)} s ago`;
  }
  return seconds < 3600 ? `${Math.round(seconds / 60)} min ago` : `${Math.round(seconds / 3600)} h ago`;
}

// The decode speed as the server stored it when the request ended: the figure its answer
// reported (and the cell's footer showed), not one recomputed here.
function tokensPerSecond(row: HistoryRow): string {
  const speed = row.timings?.tokens_per_second;
  return speed === null || speed === undefined ? '' : speed.toFixed(1);
}

function basename(path: string | null): string {
  return path ? path.split('/').pop() || path : '';
}

export class MlxSidebar extends Widget {
  constructor(private readonly model: MlxModel) {
    super();
    this.id = 'mlx-jupyter-sidebar';
    this.addClass('mlx-Sidebar');
    this.node.dataset.testid = 'mlx-sidebar';
    model.changed.connect(this.render, this);
    this.render();
  }

  protected onAfterAttach(): void {
    this.model.detailed = this.isVisible; // a layout restored with the panel open
  }

  protected onAfterShow(): void {
    this.model.detailed = true;
    void this.model.refresh(); // fresh figures the moment it is opened
  }

  protected onAfterHide(): void {
    this.model.detailed = false;
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }

  render(): void {
    const { status, error, actionError } = this.model;
    const parts: Child[] = [h('h2', {}, 'MLX models')];
    if (error) {
      parts.push(h('div', { class: 'mlx-Error', 'data-testid': 'mlx-error' }, error));
    }
    if (actionError) {
      parts.push(h('div', { class: 'mlx-Error', 'data-testid': 'mlx-action-error' }, actionError));
    }
    if (status) {
      parts.push(this.memory(), this.modelList(), this.queueList(), this.recentList());
    } else if (!error) {
      parts.push(h('div', { class: 'mlx-Empty' }, 'Connecting…'));
    }
    this.node.replaceChildren(...(parts.filter(Boolean) as Node[]));
  }

  private memory(): HTMLElement {
    const memory = this.model.status!.memory;
    const total = memory.total || 1;
    const bar = (cls: string, bytes: number, label: string) =>
      h('div', { class: `mlx-Bar ${cls}`, style: `width: ${Math.min(100, (100 * bytes) / total).toFixed(1)}%`, title: label });
    return h(
      'section',
      { 'data-testid': 'mlx-memory' },
      h('h3', {}, 'Memory'),
      h(
        'div',
        { class: 'mlx-Gauge' },
        bar('mlx-Bar-budget', memory.budget, `budget ${gigabytes(memory.budget)}`),
        bar('mlx-Bar-used', memory.used_by_models, `used by models ${gigabytes(memory.used_by_models)}`)
      ),
      h(
        'div',
        { class: 'mlx-Caption' },
        `${gigabytes(memory.used_by_models)} used by models · ${gigabytes(memory.budget)} budget · ${gigabytes(memory.total)} RAM`
      )
    );
  }

  private modelList(): HTMLElement {
    const rows = this.model.models.map(model => this.modelRow(model));
    return h('section', { 'data-testid': 'mlx-models' }, h('h3', {}, 'Models'), ...rows);
  }

  private modelRow(model: Model): HTMLElement {
    const busy = this.model.busy.has(model.name);
    const loaded = model.status === 'loaded';
    const button = (action: 'load' | 'unload' | 'pin' | 'unpin', label: string, disabled: boolean) => {
      const element = h('button', { class: 'jp-Button mlx-Button', 'data-testid': `mlx-${action}-${model.name}` }, label) as HTMLButtonElement;
      element.disabled = disabled || busy;
      element.onclick = () => void this.model.act(model.name, action);
      return element;
    };
    return h(
      'div',
      { class: 'mlx-Model', 'data-testid': `mlx-model-${model.name}` },
      h(
        'div',
        { class: 'mlx-Model-head' },
        h('span', { class: 'mlx-Model-name' }, model.name),
        h('span', { class: `mlx-Badge mlx-Badge-${model.status}`, 'data-testid': `mlx-status-${model.name}` }, busy ? 'working…' : model.status),
        model.pinned ? h('span', { class: 'mlx-Badge' }, 'pinned') : null
      ),
      h(
        'div',
        { class: 'mlx-Caption', 'data-testid': `mlx-memory-${model.name}` },
        `estimate ${gigabytes(model.budget_bytes)}`,
        model.live ? ` · live ${gigabytes(model.live.live_bytes)}` : null,
        model.live && model.live.prompt_cache_bytes ? ` (${gigabytes(model.live.prompt_cache_bytes)} prompt cache)` : null,
        ` · last used ${ago(model.last_used_at)}`
      ),
      model.error ? h('div', { class: 'mlx-Error' }, model.error) : null,
      h(
        'div',
        { class: 'mlx-Actions' },
        button('load', 'Load', loaded),
        button('unload', 'Unload', !loaded),
        model.pinned ? button('unpin', 'Unpin', false) : button('pin', 'Pin', false)
      )
    );
  }

  private queueList(): HTMLElement {
    const queue = this.model.queue;
    const items: Child[] = [];
    for (const [name, entry] of Object.entries(queue ? queue.models : {})) {
      const line = (id: string, text: string) => {
        const cancel = h('button', { class: 'jp-Button mlx-Button', 'data-testid': `mlx-cancel-${id}` }, 'Cancel') as HTMLButtonElement;
        cancel.onclick = () => void this.model.cancel(id);
        return h('li', { 'data-testid': `mlx-request-${id}` }, h('span', {}, text), cancel);
      };
      entry.active.forEach(r => items.push(line(r.request_id, `${name} · running · priority ${r.priority}`)));
      entry.queued.forEach(r => items.push(line(r.request_id, `${name} · #${r.position} in line · priority ${r.priority}`)));
    }
    return h(
      'section',
      { 'data-testid': 'mlx-queue' },
      h('h3', {}, `Queue (${queue ? queue.queued : 0} waiting)`),
      items.length ? h('ul', { class: 'mlx-List' }, ...items) : h('div', { class: 'mlx-Empty' }, 'Nothing running.')
    );
  }

  private recentList(): HTMLElement {
    const items = this.model.recent.map(row => {
      const speed = tokensPerSecond(row);
      const facts = [
        row.model,
        row.completion_tokens === null ? null : `${row.completion_tokens} tokens`,
        speed ? `${speed} tok/s` : null,
        row.status
      ].filter(Boolean);
      return h(
        'li',
        { 'data-testid': `mlx-recent-${row.id}`, 'data-notebook': row.notebook || '', 'data-status': row.status },
        h('div', { class: 'mlx-Recent-notebook', title: row.notebook || '' }, basename(row.notebook) || '(no notebook)'),
        h('div', { class: 'mlx-Caption' }, facts.join(' · '))
      );
    });
    return h(
      'section',
      { 'data-testid': 'mlx-recent' },
      h('h3', {}, 'Recent requests'),
      items.length ? h('ul', { class: 'mlx-List mlx-Recent' }, ...items) : h('div', { class: 'mlx-Empty' }, 'No requests yet.')
    );
  }
}

export class MlxStatusItem extends Widget {
  constructor(private readonly model: MlxModel) {
    super();
    this.addClass('mlx-StatusItem');
    this.node.dataset.testid = 'mlx-statusbar';
    model.changed.connect(this.render, this);
    this.render();
  }

  dispose(): void {
    this.model.changed.disconnect(this.render, this);
    super.dispose();
  }

  render(): void {
    const status = this.model.status;
    this.node.textContent =
      this.model.error || !status
        ? 'MLX: offline'
        : `MLX: ${status.models.loaded_count} loaded · ${status.queue.queued} queued`;
    this.node.title = this.model.error || 'mlx-jupyter: loaded models and waiting requests';
  }
}
