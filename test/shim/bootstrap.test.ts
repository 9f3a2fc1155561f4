import t from 'tap';
import { create, fromBinary, toBinary } from '@bufbuild/protobuf';
import { AnySchema } from '@bufbuild/protobuf/wkt';
import {
  BootstrapParamsSchema,
  BootstrapResultSchema,
  LogLevel,
} from '../../src/gen/containerd/runtime/bootstrap/v1/bootstrap_pb.js';
import { OptionsSchema } from '../../src/gen/runtimeoptions/v1/api_pb.js';
import { configPathOfOptions, isDebugLevel, mayBeBootstrap, parseStartInput, startReply } from '../../src/shim/bootstrap.js';
import { encodeAny, packAny } from '../../src/wire/any.js';

const who = { id: 'c1', namespace: 'default' };
const optionsAny = packAny(OptionsSchema, create(OptionsSchema, { typeUrl: 'io.containerd.thaw.v2.options', configPath: '/etc/thaw/x.json' }));

t.test('empty stdin: legacy without options', async (t) => {
  const input = await parseStartInput(new Uint8Array(0), who);
  t.equal(input.protocol, 'legacy');
  t.equal(input.options.configPath, '');
  t.equal(Buffer.from(await startReply(input, 'unix:///run/containerd/s/x')).toString(), 'unix:///run/containerd/s/x');
});

t.test('legacy stdin: runtime options Any', async (t) => {
  const input = await parseStartInput(encodeAny(optionsAny), who);
  t.equal(input.protocol, 'legacy');
  t.equal(input.options.configPath, '/etc/thaw/x.json');
  t.equal(input.options.options?.typeUrl, 'io.containerd.thaw.v2.options');
  t.equal(input.options.raw?.typeUrl, 'runtimeoptions.v1.Options');
});

t.test('legacy stdin with another options type keeps the raw Any', async (t) => {
  const other = encodeAny(create(AnySchema, { typeUrl: 'containerd.runc.v1.Options', value: Uint8Array.of(0x08, 0x01) }));
  const input = await parseStartInput(other, who);
  t.equal(input.protocol, 'legacy');
  t.equal(input.options.configPath, '');
  t.equal(input.options.raw?.typeUrl, 'containerd.runc.v1.Options');
});

t.test('containerd 2.3 BootstrapParams are recognised by id and namespace', async (t) => {
  const params = create(BootstrapParamsSchema, {
    instanceId: 'c1',
    namespace: 'default',
    logLevel: LogLevel.DEBUG,
    containerdGrpcAddress: '/run/containerd/containerd.sock',
    containerdTtrpcAddress: '/run/containerd/containerd.sock.ttrpc',
    extensions: [{ value: optionsAny }],
    socketDir: '/run/containerd/s2',
  });
  const input = await parseStartInput(toBinary(BootstrapParamsSchema, params), who);
  t.equal(input.protocol, 'bootstrap');
  if (input.protocol !== 'bootstrap') return;
  t.equal(input.params.socketDir, '/run/containerd/s2');
  t.equal(input.options.configPath, '/etc/thaw/x.json');
  t.ok(isDebugLevel(input.params.logLevel));
  const reply = fromBinary(BootstrapResultSchema, await startReply(input, 'unix:///s/x'));
  t.equal(reply.version, 2);
  t.equal(reply.address, 'unix:///s/x');
  t.equal(reply.protocol, 'ttrpc');

  const otherId = await parseStartInput(toBinary(BootstrapParamsSchema, create(BootstrapParamsSchema, { instanceId: 'c2', namespace: 'default' })), who);
  t.equal(otherId.protocol, 'legacy', 'params for another instance are not ours');
});

t.test('log levels', async (t) => {
  t.ok(isDebugLevel(LogLevel.TRACE));
  t.ok(isDebugLevel(LogLevel.DEBUG));
  t.notOk(isDebugLevel(LogLevel.INFO));
  t.notOk(isDebugLevel(-2), 'an unknown level between DEBUG and INFO is not debug');
});

t.test('garbage stdin is an InvalidArgument', async (t) => {
  await t.rejects(parseStartInput(Uint8Array.of(0x0a, 0x7f, 0x01), who), { code: 'InvalidArgument' });
});

t.test('mayBeBootstrap: no for any legacy options Any, yes for our BootstrapParams and when it cannot tell', async (t) => {
  const params = (instanceId: string) => toBinary(BootstrapParamsSchema, create(BootstrapParamsSchema, { instanceId, namespace: 'default', socketDir: '/s' }));
  t.equal(mayBeBootstrap(encodeAny(optionsAny), 'c1'), false, 'runtime options');
  t.equal(mayBeBootstrap(encodeAny(create(AnySchema, { typeUrl: 'containerd.runc.v1.Options' })), 'c1'), false, 'another options type');
  t.equal(mayBeBootstrap(params('c1'), 'c1'), true, 'params for this instance');
  t.equal(mayBeBootstrap(params('c10'), 'c1'), false, 'params for another instance (parseStartInput says legacy too)');
  t.equal(mayBeBootstrap(params('c1'), 'c'), false);
  // An Any whose type URL happens to equal the id: parseStartInput decides.
  t.equal(mayBeBootstrap(encodeAny(create(AnySchema, { typeUrl: 'c1' })), 'c1'), true);
  const long = 'x'.repeat(130);
  t.equal(mayBeBootstrap(params(long), long), true, 'a long id: cannot tell cheaply');
  t.equal(mayBeBootstrap(Uint8Array.of(0x0a), 'c1'), false, 'too short');
  // Whatever it says no to, parseStartInput also reads as legacy.
  for (const stdin of [encodeAny(optionsAny), params('c10')]) {
    t.equal((await parseStartInput(stdin, who)).protocol, 'legacy');
  }
});

t.test('configPathOfOptions: what serve reads from options start did not decode', async (t) => {
  t.equal(await configPathOfOptions(encodeAny(optionsAny)), '/etc/thaw/x.json');
  t.equal(await configPathOfOptions(encodeAny(create(AnySchema, { typeUrl: 'containerd.runc.v1.Options' }))), '');
  await t.rejects(configPathOfOptions(Uint8Array.of(0x0a, 0x7f, 0x01)), { code: 'InvalidArgument' });
});
