// The mlx-jupyter REST API as the sidebar uses it. Every request goes through Jupyter's
// ServerConnection, so the token, the XSRF cookie and the base URL are Jupyter's own.
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface LoadedModel {
  name: string;
  status: string;
  pid: number | null;
  budget_bytes: number;
  rss_bytes: number | null;
  active_requests: number;
}

export interface Status {
  version: string;
  memory: {
    total: number;
    available: number;
    budget: number;
    used_by_models: number;
  };
  models: { loaded_count: number; loaded: LoadedModel[] };
  queue: {
    queued: number;
    models: Record<string, { queued_requests: number; active_requests: number }>;
  };
}

// What a loaded model's worker holds now, by its own report.
export interface LiveMemory {
  rss_bytes: number;
  live_bytes: number;
  mlx_active_bytes: number;
  mlx_cache_bytes: number;
  prompt_cache_bytes: number;
  prompt_cache_entries: number;
}

export interface Model {
  name: string;
  status: string;
  source: string;
  budget_bytes: number | null;
  live: LiveMemory | null;
  pinned: boolean;
  last_used_at: string | null;
  error: string | null;
}

export interface QueuedRequest {
  request_id: string;
  priority: number;
  waited_seconds: number;
  position?: number;
  eta_seconds?: number | null;
}

export interface Queue {
  queued: number;
  models: Record<string, { active: QueuedRequest[]; queued: QueuedRequest[] }>;
}

/** A request's figures, computed once by the server when it ended (contracts.generation.Timings). */
export interface Timings {
  queue_ms: number | null;
  ttft_ms: number | null;
  total_ms: number;
  tokens_per_second: number | null;
  prompt_tokens_per_second: number | null;
}

export interface HistoryRow {
  id: string;
  model: string;
  notebook: string | null;
  status: string;
  completion_tokens: number | null;
  started_at: string | null;
  finished_at: string | null;
  created_at: string;
  timings: Timings | null;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

async function request<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'mlx', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ApiError(0, 'The Jupyter server cannot be reached; retrying…');
  }
  const text = await response.text();
  let body: any = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    if (response.status === 404 && path === 'api/status') {
      throw new ApiError(
        404,
        'This Jupyter server does not run the mlx-jupyter extension: ' +
          'enable it (jupyter server extension enable mlx_jupyter) and restart.'
      );
    }
    throw new ApiError(
      response.status,
      (body && (body.message || (body.error && body.error.message))) ||
        `HTTP ${response.status}`
    );
  }
  return body as T;
}

/** The answer of an older server lacks parts the sidebar shows: say so instead. */
export function checkStatus(status: any): Status {
  if (!status || !status.memory || !status.models || !status.queue) {
    const version = status && status.version ? status.version : 'unknown';
    throw new ApiError(
      200,
      `The mlx-jupyter server (version ${version}) is older than this sidebar: ` +
        'upgrade it (pip install -U mlx-jupyter) and restart Jupyter.'
    );
  }
  return status as Status;
}

export const api = {
  status: async (): Promise<Status> => checkStatus(await request<any>('api/status')),
  models: async (): Promise<Model[]> =>
    (await request<{ models: Model[] }>('api/models')).models,
  queue: (): Promise<Queue> => request<Queue>('api/queue'),
  history: async (limit: number): Promise<HistoryRow[]> =>
    (await request<{ requests: HistoryRow[] }>(`api/requests?limit=${limit}`)).requests,
  act: (name: string, action: 'load' | 'unload' | 'pin' | 'unpin'): Promise<Model> =>
    request<Model>(
      `api/models/${name.split('/').map(encodeURIComponent).join('/')}/${action}`,
      { method: 'POST' }
    ),
  cancel: (requestId: string): Promise<unknown> =>
    request(`api/requests/${encodeURIComponent(requestId)}`, { method: 'DELETE' })
};
