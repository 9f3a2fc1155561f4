import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ContainerdHarness } from './containerd.js';
import { buildOciImage, buildRootfs } from './oci-image.js';

/**
 * A kubelet stand-in for the CRI tests: a promise-returning RuntimeService client over containerd's
 * CRI socket, built with @grpc/grpc-js and @grpc/proto-loader (dev dependencies) from the vendored
 * CRI proto.
 */
export type Grpc = typeof import('@grpc/grpc-js');
export type ProtoLoader = typeof import('@grpc/proto-loader');
export interface CriDeps {
  grpc: Grpc;
  loader: ProtoLoader;
}

export const CRI_PROTO = fileURLToPath(new URL('../fixtures/cri/api.proto', import.meta.url));
/** containerd's namespace for CRI objects. */
export const CRI_NS = 'k8s.io';

/** The two gRPC packages, or why a test must skip. */
export async function loadGrpc(): Promise<CriDeps | string> {
  try {
    return { grpc: await import('@grpc/grpc-js'), loader: await import('@grpc/proto-loader') };
  } catch {
    return '@grpc/grpc-js and @grpc/proto-loader are not installed (npm devDependencies)';
  }
}

export type CriCall = (method: string, request: Record<string, unknown>, timeoutMs?: number) => Promise<Record<string, unknown>>;

export function criClient({ grpc, loader }: CriDeps, socket: string): { call: CriCall; close: () => void } {
  const def = loader.loadSync(CRI_PROTO, { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true });
  const pkg = grpc.loadPackageDefinition(def) as unknown as {
    runtime: { v1: { RuntimeService: new (address: string, creds: ReturnType<Grpc['credentials']['createInsecure']>) => Record<string, unknown> & { close(): void } } };
  };
  const client = new pkg.runtime.v1.RuntimeService(`unix://${socket}`, grpc.credentials.createInsecure());
  const call: CriCall = (method, request, timeoutMs = 120_000) =>
    new Promise((resolve, reject) => {
      const fn = client[method] as (req: unknown, opts: { deadline: Date }, cb: (err: Error | null, res: Record<string, unknown>) => void) => void;
      fn.call(client, request, { deadline: new Date(Date.now() + timeoutMs) }, (err, res) => (err ? reject(err) : resolve(res)));
    });
  return { call, close: () => client.close() };
}

/**
 * A containerd with CRI on (runsc with `--network=host` in the pod's netns) and one image in CRI's
 * namespace, `name`, that sleeps: the pod sandbox image and the app image of a CRI test at once.
 */
export async function startCriHarness(
  t: { teardown: (fn: () => Promise<void>) => void },
  o: { prefix: string; image: string; demoApp?: boolean },
): Promise<ContainerdHarness> {
  const h = await ContainerdHarness.start(t.teardown.bind(t), {
    prefix: o.prefix,
    cri: { sandboxImage: o.image },
    thawConfig: { runsc: { network: 'host' } },
  });
  const rootfs = await buildRootfs({ dir: path.join(h.dir, 'rootfs'), demoApp: o.demoApp ?? false });
  const built = await buildOciImage({ workDir: h.dir, rootfs, name: o.image, cmd: ['/bin/sleep', '2147483647'], out: path.join(h.dir, 'image.tar') });
  await h.importImage(built.tar, CRI_NS);
  return h;
}
