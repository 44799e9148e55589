// Type declarations for @ferrocast/react (index.js).

import type { ReactElement, ReactNode } from 'react';
import type {
  Ferrocast,
  FerrocastOptions,
  GapEvent,
  MessageMeta,
  State,
  StateDetail,
  Transport,
} from '@ferrocast/client';

export type ChannelStatus = 'idle' | 'connecting' | 'live' | 'recovering' | 'error' | 'disconnected';

/** Channel statuses a useChannel result can have. */
export const CHANNEL_STATUSES: readonly ChannelStatus[];

export interface FerrocastProviderProps {
  /** Base URL of the gateway (default: the page's origin). Ignored when `client` is given. */
  url?: string;
  /** A client to share; the provider never closes it. Without it the provider creates and closes its own. */
  client?: Ferrocast | null;
  /** Options for the client the provider creates; read once, when it is created. */
  options?: FerrocastOptions;
  children?: ReactNode;
}

export function FerrocastProvider(props: FerrocastProviderProps): ReactElement;

/** The provider's client; null while it is being created (first render, server rendering). Throws outside a provider. */
export function useClient(): Ferrocast | null;

export interface ConnectionState {
  state: State;
  detail: StateDetail | null;
  transport: Transport | null;
  session: string | null;
}

/** The client's connection state; re-renders on every state change. */
export function useConnectionState(): ConnectionState;

/** A message as useChannel keeps it: its data and the client's meta. */
export interface ChannelMessage<T> extends MessageMeta {
  data: T;
}

export interface ChannelError {
  /** The server's error code (e.g. `limit_exceeded`), `unsubscribed`, or `disconnected`. */
  code: string;
  message: string;
  /** For `disconnected`: the close code that stopped the client. */
  closeCode?: number | null;
}

export interface ChannelState<T> {
  /** The latest message's data; `initialData` (or undefined) until one arrives. */
  data: T | undefined;
  message: ChannelMessage<T> | null;
  status: ChannelStatus;
  error: ChannelError | null;
}

export interface UseChannelOptions<T> {
  /** Subscribe only while true. Default true. */
  enabled?: boolean;
  /** Called for every message of the channel (the latest function given is used). */
  onMessage?: (data: T, meta: MessageMeta) => void;
  /** Called for every gap of the channel; reload its state (e.g. from the history API). */
  onGap?: (gap: GapEvent) => void;
  /** `data` until the first message. */
  initialData?: T;
  /** A client other than the provider's. */
  client?: Ferrocast | null;
}

/** The latest value and subscription status of a channel; components on one channel share one subscription. */
export function useChannel<T = unknown>(channel: string | null | undefined, options?: UseChannelOptions<T>): ChannelState<T>;

/** A stable function publishing on `channel` through the provider's client. */
export function usePublish(channel: string): (data: unknown) => Promise<Record<string, unknown>>;
