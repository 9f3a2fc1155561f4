import t from 'tap';
import { isShimVerb, parseShimArgs } from '../../src/cli/shim-flags.js';

const ctd16 = ['-namespace', 'default', '-address', '/run/containerd/containerd.sock', '-publish-binary', '/usr/bin/containerd', '-id', 'c1', 'start'];

t.test('accepted argv', async (t) => {
  const table: { name: string; argv: string[]; want: Record<string, unknown>; verb: string | undefined }[] = [
    {
      name: 'containerd 1.6 start',
      argv: ctd16,
      want: { namespace: 'default', address: '/run/containerd/containerd.sock', publishBinary: '/usr/bin/containerd', id: 'c1', debug: false },
      verb: 'start',
    },
    {
      name: 'debug start',
      argv: [...ctd16.slice(0, -1), '-debug', 'start'],
      want: { id: 'c1', debug: true },
      verb: 'start',
    },
    {
      name: 'delete with bundle',
      argv: ['-namespace', 'k8s.io', '-address', 'a', '-publish-binary', 'b', '-id', 'x', '-bundle', '/b/x', 'delete'],
      want: { namespace: 'k8s.io', bundle: '/b/x' },
      verb: 'delete',
    },
    {
      name: 'verb first, flags after (position-independent)',
      argv: ['start', '-id', 'c2', '-namespace=ns'],
      want: { id: 'c2', namespace: 'ns' },
      verb: 'start',
    },
    {
      name: '-flag=value and --flag value',
      argv: ['-address=/x.sock', '--publish-binary', '/bin/ctd', '--id=a=b', 'serve'],
      want: { address: '/x.sock', publishBinary: '/bin/ctd', id: 'a=b' },
      verb: 'serve',
    },
    { name: '-v', argv: ['-v'], want: { version: true }, verb: undefined },
    { name: '--version', argv: ['--version'], want: { version: true }, verb: undefined },
    { name: '-info', argv: ['-info'], want: { info: true }, verb: undefined },
    { name: 'bool with =false', argv: ['-debug=false', 'start'], want: { debug: false }, verb: 'start' },
    { name: 'bool with =1', argv: ['-debug=1', 'start'], want: { debug: true }, verb: 'start' },
    { name: 'empty string value', argv: ['-namespace', '', 'start'], want: { namespace: '' }, verb: 'start' },
    { name: 'value starting with a dash', argv: ['-id', '-weird', 'start'], want: { id: '-weird' }, verb: 'start' },
    { name: '-- ends flags', argv: ['-id', 'x', '--', '-notaflag'], want: { id: 'x' }, verb: '-notaflag' },
    { name: 'serve flags from our start', argv: ['-socket', '/run/containerd/s/ab', '-config-path', '/etc/thaw.json', 'serve'], want: { socket: '/run/containerd/s/ab', configPath: '/etc/thaw.json' }, verb: 'serve' },
  ];
  for (const row of table) {
    const parsed = parseShimArgs(row.argv);
    t.match(parsed.flags, row.want, row.name);
    t.equal(parsed.verb, row.verb, `${row.name}: verb`);
  }
});

t.test('rejected argv', async (t) => {
  const table: [string[], RegExp][] = [
    [['-nope', 'start'], /flag provided but not defined: -nope/],
    [['-id'], /flag needs an argument: -id/],
    [['-debug=maybe'], /invalid boolean value/],
    [['---id', 'x'], /bad flag syntax/],
    [['-=x'], /bad flag syntax/],
  ];
  for (const [argv, message] of table) t.throws(() => parseShimArgs(argv), { code: 'InvalidArgument', message }, argv.join(' '));
});

t.test('verbs', async (t) => {
  t.ok(isShimVerb('start'));
  t.ok(isShimVerb('delete'));
  t.ok(isShimVerb('serve'));
  t.notOk(isShimVerb('run'));
  t.notOk(isShimVerb(undefined));
});
