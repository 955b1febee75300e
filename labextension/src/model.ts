// What the sidebar and the status bar show, refreshed by one Poll: every 2 s while the page
// is visible, backing off (up to 30 s) while the server does not answer, standing by while the
// browser tab is hidden.
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { api, ApiError, HistoryRow, Model, ModelAction, Queue, Status } from './api';

export const RECENT_REQUESTS = 8;

export class MlxModel {
  status: Status | null = null;
  models: Model[] = [];
  queue: Queue | null = null;
  recent: HistoryRow[] = [];
  error: string | null = null; // why the last refresh failed
  // While the sidebar is closed only the status bar shows: one cheap request per poll.
  detailed = false;
  actionError: string | null = null; // why the last button press failed
  busy = new Set<string>(); // models with an action under way

  readonly poll: Poll;
  private _changed = new Signal<this, void>(this);

  constructor() {
    this.poll = new Poll({
      auto: true,
      factory: () => this._refresh(),
      frequency: { interval: 2000, backoff: true, max: 30000 },
      name: 'mlx-jupyter:sidebar',
      standby: 'when-hidden'
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  refresh(): Promise<void> {
    return this.poll.refresh();
  }

  /** Runs a model action; a refusal (a 409 when the model does not fit) is shown as is. */
  async act(name: string, action: ModelAction): Promise<void> {
    this.busy.add(name);
    this.actionError = null;
    this._changed.emit();
    try {
      await api.act(name, action);
    } catch (error) {
      this.actionError = `${action} ${name}: ${(error as Error).message}`;
    } finally {
      this.busy.delete(name);
    }
    await this.refresh();
  }

  async cancel(requestId: string): Promise<void> {
    this.actionError = null;
    try {
      await api.cancel(requestId);
    } catch (error) {
      this.actionError = `cancel ${requestId}: ${(error as Error).message}`;
    }
    await this.refresh();
  }

  dispose(): void {
    this.poll.dispose();
  }

  private async _refresh(): Promise<void> {
    try {
      if (!this.detailed) {
        Object.assign(this, { status: await api.status(), error: null });
        return;
      }
      const [status, models, queue, recent] = await Promise.all([
        api.status(),
        api.models(),
        api.queue(),
        api.history(RECENT_REQUESTS)
      ]);
      Object.assign(this, { status, models, queue, recent, error: null });
    } catch (error) {
      this.error =
        error instanceof ApiError ? error.message : `Unexpected error: ${String(error)}`;
      throw error; // the Poll backs off
    } finally {
      this._changed.emit();
    }
  }
}
