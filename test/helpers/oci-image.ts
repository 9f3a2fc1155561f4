/**
 * Local OCI images for the containerd tests, built without a registry: a rootfs of busybox-static
 * (plus, optionally, the demo app compiled static), packed as one gzip layer into an OCI layout
 * tar that `ctr image import` takes. Deterministic (sorted tar, mtime 0, gzip without a name), so
 * the same inputs give the same digests.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { repo } from './containerd.js';

export const DEMO_APP_SOURCE = path.join(repo, 'demo/app/thaw-demo-app.c');
const BUSYBOX_CANDIDATES = ['/bin/busybox', '/usr/bin/busybox'];
/** Applets the tests call by name (busybox-static dispatches on argv[0]). */
const APPLETS = ['sh', 'echo', 'cat', 'ls', 'sleep', 'true', 'false', 'ps', 'kill', 'printf', 'env', 'id', 'ip', 'hostname', 'httpd', 'wget', 'nc'];

export interface RootfsOptions {
  /** Directory to create (must not exist yet, or be empty). */
  dir: string;
  /** Compile demo/app/thaw-demo-app.c with `gcc -O2 -static` into /app. */
  demoApp?: boolean;
}

/** Why an image cannot be built here (missing tool), or undefined. */
export function imageToolsMissing({ demoApp = false }: { demoApp?: boolean } = {}): string | undefined {
  if (!BUSYBOX_CANDIDATES.some((p) => existsSync(p))) return 'busybox-static is not installed';
  if (!existsSync('/usr/bin/tar') && !existsSync('/bin/tar')) return 'tar is not installed';
  if (demoApp && !existsSync('/usr/bin/gcc')) return 'gcc is not installed (needed for the demo app)';
  return undefined;
}

export async function buildRootfs({ dir, demoApp = false }: RootfsOptions): Promise<string> {
  const busybox = BUSYBOX_CANDIDATES.find((p) => existsSync(p));
  if (!busybox) throw new Error('busybox-static is not installed');
  for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'etc']) await mkdir(path.join(dir, d), { recursive: true });
  await copyFile(busybox, path.join(dir, 'bin/busybox'));
  await chmod(path.join(dir, 'bin/busybox'), 0o755);
  for (const a of APPLETS) await symlink('busybox', path.join(dir, 'bin', a));
  await writeFile(path.join(dir, 'etc/passwd'), 'root:x:0:0:root:/:/bin/sh\n');
  await writeFile(path.join(dir, 'etc/group'), 'root:x:0:\n');
  if (demoApp) {
    const cc = await exec('gcc', ['-O2', '-static', '-o', path.join(dir, 'app'), DEMO_APP_SOURCE]);
    if (cc.code !== 0) throw new Error(`gcc failed: ${cc.err}`);
  }
  return dir;
}

export interface ImageOptions {
  /** Scratch directory for the layout (created; removed after packing). */
  workDir: string;
  rootfs: string;
  /** Full reference, e.g. `localhost/thaw-it:1` (becomes `io.containerd.image.name`). */
  name: string;
  cmd: readonly string[];
  env?: readonly string[];
  /** Where the image tar goes. */
  out: string;
}

export interface BuiltImage {
  tar: string;
  name: string;
  manifestDigest: string;
  layerDiffId: string;
}

/** Packs `rootfs` as a one-layer OCI image tar (`ctr image import` input). */
export async function buildOciImage(o: ImageOptions): Promise<BuiltImage> {
  const layout = path.join(o.workDir, 'oci');
  const blobs = path.join(layout, 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  const layerTar = path.join(o.workDir, 'layer.tar');
  const tar = await exec('tar', ['--sort=name', '--owner=0', '--group=0', '--numeric-owner', '--mtime=@0', '-C', o.rootfs, '-cf', layerTar, '.']);
  if (tar.code !== 0) throw new Error(`tar failed: ${tar.err}`);
  const layer = await readFile(layerTar);
  await rm(layerTar);
  const put = async (data: Buffer | string): Promise<{ digest: string; size: number }> => {
    const digest = sha256(data);
    await writeFile(path.join(blobs, digest.slice('sha256:'.length)), data);
    return { digest, size: Buffer.byteLength(data) };
  };
  const layerDiffId = sha256(layer);
  const gz = await put(gzipSync(layer));
  const config = await put(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      config: { Env: o.env ?? ['PATH=/bin'], Cmd: o.cmd, WorkingDir: '/' },
      rootfs: { type: 'layers', diff_ids: [layerDiffId] },
    }),
  );
  const manifest = await put(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...gz }],
    }),
  );
  const tag = o.name.slice(o.name.lastIndexOf(':') + 1);
  await writeFile(path.join(layout, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  await writeFile(
    path.join(layout, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          ...manifest,
          annotations: { 'io.containerd.image.name': o.name, 'org.opencontainers.image.ref.name': tag },
        },
      ],
    }),
  );
  const pack = await exec('tar', ['-C', layout, '-cf', o.out, 'oci-layout', 'index.json', 'blobs']);
  if (pack.code !== 0) throw new Error(`tar failed: ${pack.err}`);
  await rm(layout, { recursive: true, force: true });
  return { tar: o.out, name: o.name, manifestDigest: manifest.digest, layerDiffId };
}

function sha256(data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

function exec(file: string, args: readonly string[]): Promise<{ code: number | null; err: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, err });
    });
  });
}

export interface DemoImageOptions {
  /** Scratch directory (created). */
  dir: string;
  name: string;
  /** Image Cmd; default: the demo app with its defaults. */
  cmd?: readonly string[];
}

/** busybox + the demo app as /app, packed as an image tar under `dir`. */
export async function buildDemoImage({ dir, name, cmd = ['/app'] }: DemoImageOptions): Promise<BuiltImage> {
  await mkdir(dir, { recursive: true });
  const rootfs = await buildRootfs({ dir: path.join(dir, 'rootfs'), demoApp: true });
  const image = await buildOciImage({ workDir: dir, rootfs, name, cmd, out: path.join(dir, 'image.tar') });
  await rm(rootfs, { recursive: true, force: true });
  return image;
}

/** Tick numbers the demo app printed ("TICK n=<n> t=<ms>"), in order. */
export function ticksOf(output: string | readonly string[]): number[] {
  const lines = typeof output === 'string' ? output.split('\n') : output;
  const out: number[] = [];
  for (const l of lines) {
    const m = /^TICK n=(\d+) /.exec(l);
    if (m) out.push(Number(m[1]));
  }
  return out;
}
