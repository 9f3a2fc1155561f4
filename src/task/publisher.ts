import { create, createRegistry, type DescMessage, type MessageShape } from '@bufbuild/protobuf';
import {
  file_containerd_events_task,
  type TaskCheckpointed,
  type TaskCreate,
  type TaskDelete,
  type TaskExecAdded,
  type TaskExecStarted,
  type TaskExit,
  type TaskOOM,
  type TaskPaused,
  type TaskResumed,
  type TaskStart,
} from '../gen/containerd/events/task_pb.js';
import { Events, ForwardRequestSchema } from '../gen/containerd/services/events/ttrpc/v1/events_pb.js';
import { EnvelopeSchema, type Envelope } from '../gen/containerd/types/event_pb.js';
import { ShimError } from '../errors.js';
import { silentLogger, type Logger } from '../log/logger.js';
import { TtrpcClient, TtrpcClosedError } from '../ttrpc/client.js';
import { packAny } from '../wire/any.js';
import { timestampNow } from '../wire/timestamp.js';

/** The task events a shim publishes, and their topics (containerd's runtime topics). */
export type TaskEvent =
  | TaskCreate
  | TaskStart
  | TaskExit
  | TaskDelete
  | TaskExecAdded
  | TaskExecStarted
  | TaskPaused
  | TaskResumed
  | TaskOOM
  | TaskCheckpointed;

export const TASK_TOPICS = {
  'containerd.events.TaskCreate': '/tasks/create',
  'containerd.events.TaskStart': '/tasks/start',
  'containerd.events.TaskExit': '/tasks/exit',
  'containerd.events.TaskDelete': '/tasks/delete',
  'containerd.events.TaskExecAdded': '/tasks/exec-added',
  'containerd.events.TaskExecStarted': '/tasks/exec-started',
  'containerd.events.TaskPaused': '/tasks/paused',
  'containerd.events.TaskResumed': '/tasks/resumed',
  'containerd.events.TaskOOM': '/tasks/oom',
  'containerd.events.TaskCheckpointed': '/tasks/checkpointed',
} as const satisfies Record<TaskEvent['$typeName'], string>;

export type TaskTopic = (typeof TASK_TOPICS)[keyof typeof TASK_TOPICS];

/** The topic containerd expects for an event. */
export function topicOf(event: TaskEvent): TaskTopic {
  return TASK_TOPICS[event.$typeName];
}

const eventRegistry = createRegistry(file_containerd_events_task);

export interface PublisherOptions {
  /** containerd's ttrpc address (env TTRPC_ADDRESS); undefined = log and drop every event. */
  address: string | undefined;
  /** The shim's containerd namespace, stamped on each envelope. */
  namespace: string;
  log?: Logger;
  /** Events waiting (including the one being sent); beyond it new events are dropped. */
  queueSize?: number;
  /** Retries after the first failed Forward before an event is dropped. */
  maxRetries?: number;
  /** Linear backoff: the n-th retry waits n × backoffMs. */
  backoffMs?: number;
  /** Deadline of one Forward call. */
  callTimeoutMs?: number;
  /** Seam for tests; default TtrpcClient.connect. */
  connect?: (address: string) => Promise<TtrpcClient>;
}

interface QueuedEvent {
  readonly envelope: Envelope;
}

/**
 * Forwards task events to containerd (Events.Forward on TTRPC_ADDRESS) from a background loop,
 * so an RPC never waits on containerd. One event at a time, in order: containerd must see create
 * → start → exit → delete. A failed Forward is retried up to maxRetries times with linear
 * backoff; a closed connection is reconnected once at once, without counting as a retry.
 */
export class Publisher {
  readonly #address: string | undefined;
  readonly #namespace: string;
  readonly #log: Logger;
  readonly #queueSize: number;
  readonly #maxRetries: number;
  readonly #backoffMs: number;
  readonly #callTimeoutMs: number;
  readonly #connect: (address: string) => Promise<TtrpcClient>;
  readonly #queue: QueuedEvent[] = [];
  readonly #stop = new AbortController();
  readonly #idleWaiters: (() => void)[] = [];
  #client: TtrpcClient | undefined;
  #running = false;
  #closed = false;
  #dropped = 0;
  #delivered = 0;

  constructor({
    address,
    namespace,
    log = silentLogger,
    queueSize = 128,
    maxRetries = 5,
    backoffMs = 1000,
    callTimeoutMs = 5000,
    connect = (a) => TtrpcClient.connect(a, { timeoutMs: callTimeoutMs, log }),
  }: PublisherOptions) {
    this.#address = address === '' ? undefined : address;
    this.#namespace = namespace;
    this.#log = log;
    this.#queueSize = queueSize;
    this.#maxRetries = maxRetries;
    this.#backoffMs = backoffMs;
    this.#callTimeoutMs = callTimeoutMs;
    this.#connect = connect;
    if (this.#address === undefined) log.warn('TTRPC_ADDRESS is not set: task events will be dropped');
  }

  /** Events queued or being sent. */
  get pending(): number {
    return this.#queue.length;
  }

  get dropped(): number {
    return this.#dropped;
  }

  get delivered(): number {
    return this.#delivered;
  }

  /** Queues an event for containerd and returns at once; drops it (logged) if the queue is full. */
  publish(topic: TaskTopic, event: TaskEvent): void {
    const schema = eventRegistry.getMessage(event.$typeName);
    if (!schema) throw new ShimError('InvalidArgument', `${event.$typeName} is not a task event`);
    this.publishMessage(topic, schema, event);
  }

  /** Any message under any topic (for events outside containerd.events). */
  publishMessage<D extends DescMessage>(topic: string, schema: D, message: MessageShape<D>): void {
    if (this.#closed) {
      this.#drop(topic, 'publisher closed');
      return;
    }
    if (this.#address === undefined) {
      this.#drop(topic, 'TTRPC_ADDRESS not set', 'debug');
      return;
    }
    if (this.#queue.length >= this.#queueSize) {
      this.#drop(topic, `event queue full (${this.#queueSize})`);
      return;
    }
    const envelope = create(EnvelopeSchema, {
      timestamp: timestampNow(),
      namespace: this.#namespace,
      topic,
      event: packAny(schema, message),
    });
    this.#queue.push({ envelope });
    if (!this.#running) void this.#run();
  }

  /**
   * Waits until every queued event was sent or dropped, at most timeoutMs (pending retries keep
   * their backoff), then closes the connection. Events published afterwards are dropped.
   */
  async drain(timeoutMs = 5000): Promise<void> {
    this.#closed = true;
    if (this.#queue.length > 0) {
      let timer: NodeJS.Timeout | undefined;
      const idle = new Promise<void>((resolve) => this.#idleWaiters.push(resolve));
      const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeoutMs)));
      const expired = await Promise.race([idle.then(() => false), timedOut]);
      clearTimeout(timer);
      if (expired) this.#log.warn({ pending: this.#queue.length, durationMs: timeoutMs }, 'event drain timed out; dropping the rest');
    }
    await this.close();
  }

  /** Stops at once: queued events are dropped, the connection is closed. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#stop.abort();
    if (this.#queue.length > 0) this.#dropped += this.#queue.length;
    this.#queue.length = 0;
    const client = this.#client;
    this.#client = undefined;
    await client?.close();
    this.#idleWaiters.splice(0).forEach((w) => w());
  }

  async #run(): Promise<void> {
    this.#running = true;
    try {
      while (this.#queue.length > 0 && !this.#stop.signal.aborted) {
        const item = this.#queue[0]!;
        await this.#deliver(item.envelope);
        if (this.#queue[0] === item) this.#queue.shift();
      }
    } finally {
      this.#running = false;
      if (this.#queue.length === 0) this.#idleWaiters.splice(0).forEach((w) => w());
    }
  }

  async #deliver(envelope: Envelope): Promise<void> {
    for (let attempt = 0; attempt <= this.#maxRetries; attempt++) {
      if (attempt > 0 && !(await this.#sleep(attempt * this.#backoffMs))) return;
      try {
        await this.#forwardReconnecting(envelope);
        this.#delivered++;
        return;
      } catch (err) {
        if (this.#stop.signal.aborted) return;
        this.#log.warn({ err, topic: envelope.topic, attempt: attempt + 1 }, 'forward event failed');
      }
    }
    this.#dropped++;
    this.#log.error({ topic: envelope.topic, retries: this.#maxRetries }, 'dropping event after retries');
  }

  /** One Forward; on a closed connection, reconnect once and send again. */
  async #forwardReconnecting(envelope: Envelope): Promise<void> {
    try {
      await this.#forward(envelope);
    } catch (err) {
      if (!(err instanceof TtrpcClosedError)) throw err;
      this.#log.debug({ err }, 'events connection closed; reconnecting');
      this.#client = undefined;
      await this.#forward(envelope);
    }
  }

  async #forward(envelope: Envelope): Promise<void> {
    if (this.#client === undefined || this.#client.closed) {
      this.#client = await this.#connect(this.#address!);
    }
    await this.#client.call(Events.method.forward, create(ForwardRequestSchema, { envelope }), {
      timeoutMs: this.#callTimeoutMs,
      namespace: this.#namespace,
      signal: this.#stop.signal,
    });
  }

  /** Resolves false if the publisher was closed meanwhile. */
  #sleep(ms: number): Promise<boolean> {
    const signal = this.#stop.signal;
    if (signal.aborted) return Promise.resolve(false);
    return new Promise((resolve) => {
      const onAbort = (): void => {
        clearTimeout(timer);
        resolve(false);
      };
      const timer = setTimeout(() => {
        signal.removeEventListener('abort', onAbort);
        resolve(true);
      }, ms);
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  #drop(topic: string, reason: string, level: 'debug' | 'error' = 'error'): void {
    this.#dropped++;
    this.#log[level]({ topic, reason }, 'dropping event');
  }
}
