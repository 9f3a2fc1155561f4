import { randomBytes } from 'node:crypto';
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ShimError } from '../errors.js';

/**
 * How thaw presents a CRI pod to runsc. CRI marks every container of a pod with its type
 * (`sandbox` for the pause container, `container` for the rest) and the pod's sandbox id. runsc
 * reads these and creates a `container` inside the running runsc sandbox of that id — but thaw's
 * runsc ids are fixed-length hashes, never CRI's ids, and each container must be checkpointed and
 * restored on its own, so thaw gives every pod container a runsc sandbox of its own instead.
 *
 * The pod stays one pod where it matters: runsc (with a network other than `none`) starts each
 * sandbox inside the network namespace named in the spec's `linux.namespaces`, which CRI points at
 * the pod's (the pause container's `/proc/<pid>/ns/net`), so the containers share the pod IP and
 * its loopback. Namespaces are left exactly as CRI wrote them. What a runsc sandbox always makes
 * anew (IPC, UTS, PID, mount) is not shared between pod containers.
 *
 * Only the `config.json` runsc reads changes: thaw's key and trigger logic read the spec before the
 * engine creates the container (Lifecycle.plan, prepareTrigger) and the shim groups containers by
 * sandbox id at `start`, all from the original file. The annotations are removed rather than set to
 * `sandbox`, so a later reader of the rewritten file sees a plain container, not a pause container
 * (which triggers skip); the original values stay in the file under `dev.thaw.internal.cri.`.
 */

/** runsc reads containerd's annotation first, then CRI-O's (runsc/specutils/cri.go). */
export const CRI_CONTAINER_TYPE_ANNOTATIONS = ['io.kubernetes.cri.container-type', 'io.kubernetes.cri-o.ContainerType'] as const;
export const CRI_SANDBOX_ID_ANNOTATIONS = ['io.kubernetes.cri.sandbox-id', 'io.kubernetes.cri-o.SandboxID'] as const;
/** Where the rewritten file keeps the values it took out of runsc's view, e.g. `dev.thaw.internal.cri.io.kubernetes.cri.sandbox-id`. */
export const ORIGINAL_CRI_ANNOTATION_PREFIX = 'dev.thaw.internal.cri.';

export type Annotations = Readonly<Record<string, string>>;

export type RunscCriView =
  /** runsc may read the annotations as they are (it makes this container the root of a new sandbox). */
  | { kind: 'as-is'; reason: string }
  /** A pod member: runsc must see these annotations instead, which make it a sandbox of its own. */
  | { kind: 'own-sandbox'; annotations: Record<string, string> };

/** The container type runsc derives from the annotations; undefined when none is set. */
function runscContainerType(annotations: Annotations): string | undefined {
  for (const key of CRI_CONTAINER_TYPE_ANNOTATIONS) if (Object.hasOwn(annotations, key)) return annotations[key];
  return undefined;
}

/** Decides which CRI annotations runsc sees for a container. Pure; idempotent on its own output. */
export function runscCriView(annotations: Annotations): RunscCriView {
  const type = runscContainerType(annotations);
  if (type === undefined) return { kind: 'as-is', reason: 'no CRI container type' };
  // `sandbox` (the pause container) and unknown values already make runsc start a new sandbox.
  if (type !== 'container') return { kind: 'as-is', reason: `CRI container type ${type}` };
  const out: Record<string, string> = {};
  const hidden = new Set<string>([...CRI_CONTAINER_TYPE_ANNOTATIONS, ...CRI_SANDBOX_ID_ANNOTATIONS]);
  for (const [key, value] of Object.entries(annotations)) {
    if (hidden.has(key)) out[ORIGINAL_CRI_ANNOTATION_PREFIX + key] = value;
    else out[key] = value;
  }
  return { kind: 'own-sandbox', annotations: out };
}

/**
 * Rewrites `<bundle>/config.json` (atomically) so that runsc sees `runscCriView`'s annotations;
 * returns false when the file needs no change. Call it right before `runsc create`.
 */
export async function presentCriToRunsc(bundle: string): Promise<boolean> {
  const path = join(bundle, 'config.json');
  let spec: { annotations?: unknown };
  try {
    spec = JSON.parse(await readFile(path, 'utf8')) as { annotations?: unknown };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'NotFound' : 'InvalidArgument';
    throw new ShimError(code, `bundle ${bundle}: cannot read config.json: ${(err as Error).message}`, { cause: err });
  }
  const annotations = spec.annotations;
  if (typeof annotations !== 'object' || annotations === null || Array.isArray(annotations)) return false;
  const view = runscCriView(annotations as Annotations);
  if (view.kind === 'as-is') return false;
  spec.annotations = view.annotations;
  const tmp = `${path}.thaw-${randomBytes(4).toString('hex')}.tmp`;
  try {
    await writeFile(tmp, JSON.stringify(spec, null, 2));
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw new ShimError('Internal', `bundle ${bundle}: cannot rewrite config.json for runsc: ${(err as Error).message}`, { cause: err });
  }
  return true;
}
