// The TypeScript shim, for bin/containerd-shim-thaw-v2 and for `serve`, which `start` spawns as
// `node … bin/containerd-shim-thaw-v2.mjs … serve` (a name `ps | grep containerd-shim` still finds):
// the bundle or tsc's output, as launch.mjs picks.
import('./launch.mjs').then((launcher) => launcher.run('shim'));
