import t from 'tap';
import { create, toBinary } from '@bufbuild/protobuf';
import { AnySchema } from '@bufbuild/protobuf/wkt';
import { TaskExitSchema, TaskOOMSchema } from '../../src/gen/containerd/events/task_pb.js';
import { OptionsSchema } from '../../src/gen/runtimeoptions/v1/api_pb.js';
import { anyIs, anyTypeName, decodeAny, encodeAny, packAny, unpackAny } from '../../src/wire/any.js';

t.test('packs with the bare type URL containerd uses', async (t) => {
  const any = packAny(TaskExitSchema, create(TaskExitSchema, { containerId: 'c1', id: 'c1', pid: 9, exitStatus: 137 }));
  t.equal(any.typeUrl, 'containerd.events.TaskExit');
  const back = unpackAny(any, TaskExitSchema);
  t.equal(back?.pid, 9);
  t.equal(back?.exitStatus, 137);
  t.equal(unpackAny(any, TaskOOMSchema), undefined, 'another type is not unpacked');
});

t.test('accepts the type.googleapis.com/ prefix on read', async (t) => {
  const value = toBinary(TaskOOMSchema, create(TaskOOMSchema, { containerId: 'x' }));
  const any = create(AnySchema, { typeUrl: 'type.googleapis.com/containerd.events.TaskOOM', value });
  t.equal(anyTypeName(any), 'containerd.events.TaskOOM');
  t.ok(anyIs(any, TaskOOMSchema));
  t.equal(unpackAny(any, TaskOOMSchema)?.containerId, 'x');
  t.notOk(anyIs(create(AnySchema, {}), TaskOOMSchema), 'empty Any holds nothing');
});

t.test('decodes the runtime options bytes containerd 1.6 sends on stdin', async (t) => {
  // The byte layout protocol.md §2 records from containerd 1.6.20 (`ctr run --runtime-config-path P`).
  const path = '/etc/thaw/config-for-a-test.json';
  const inner = Buffer.concat([Buffer.from([0x12, path.length]), Buffer.from(path)]);
  const typeUrl = 'runtimeoptions.v1.Options';
  const stdin = Buffer.concat([Buffer.from([0x0a, typeUrl.length]), Buffer.from(typeUrl), Buffer.from([0x12, inner.length]), inner]);
  const any = decodeAny(stdin);
  t.equal(any.typeUrl, typeUrl);
  t.equal(unpackAny(any, OptionsSchema)?.configPath, path);
  t.same(Buffer.from(encodeAny(any)), stdin, 're-encodes byte for byte');
  t.throws(() => decodeAny(Uint8Array.of(0x0a, 0x7f)), { code: 'InvalidArgument' });
  t.throws(() => unpackAny(create(AnySchema, { typeUrl, value: Uint8Array.of(0x12, 0x09) }), OptionsSchema), { code: 'InvalidArgument' });
});
