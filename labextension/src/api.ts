// The mlx-jupyter REST API as the sidebar uses it. Every request goes through Jupyter's
// ServerConnection, so the token, the XSRF cookie and the base URL are Jupyter's own.
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type { components, paths } from './schema';

// The answers' types are the OpenAPI document's (schema.d.ts, generated from it by
// scripts/sidebar_types.py): a field renamed on the server fails this build.
type Schemas = components['schemas'];

export type Status = Schemas['Status'];
export type LoadedModel = Schemas['ModelState'];
/** What a loaded model's worker holds now, by its own report. */
export type LiveMemory = Schemas['LiveMemory'];
export type Model = Schemas['ModelDescription'];
export type QueuedRequest = Schemas['QueuedRequest'];
export type WaitingRequest = Schemas['WaitingRequest'];
export type Queue = Schemas['QueueSnapshot'];
/** A request's figures, computed once by the server when it ended. */
export type Timings = Schemas['Timings'];
export type HistoryRow = Schemas['HistoryRow'];
export type ModelAction =
  paths['/mlx/api/models/{name}/{action}']['post']['parameters']['path']['action'];

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
    (await request<Schemas['ModelList']>('api/models')).models,
  queue: (): Promise<Queue> => request<Queue>('api/queue'),
  history: async (limit: number): Promise<HistoryRow[]> =>
    (await request<Schemas['HistoryPage']>(`api/requests?limit=${limit}`)).requests,
  // A name may hold "/" (org/name): each of its segments is encoded, the slashes kept.
  act: (name: string, action: ModelAction): Promise<Model> =>
    request<Model>(
      `api/models/${name.split('/').map(encodeURIComponent).join('/')}/${action}`,
      { method: 'POST' }
    ),
  cancel: (requestId: string): Promise<Schemas['Cancellation']> =>
    request(`api/requests/${encodeURIComponent(requestId)}`, { method: 'DELETE' })
};
