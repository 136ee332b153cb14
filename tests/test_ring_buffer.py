"""ConAdv's ring buffer: a write sets one slot of its own replica and touches nothing else.

Checked against NumPy copies of the slots taken before each write: under the
default strategy, inside an XLA-compiled function, and under MirroredStrategy
over two logical CPUs (in a child process, as logical devices must be set up
before TensorFlow starts). The traced read and write must not build any
tensor of the whole ring's shape, which is what a rewrite of all τ slots (or a
dense read of them) per call would need.
"""

import ml_dtypes
import numpy as np
import tensorflow as tf

from conadv.ring_buffer import RingBuffer
from tests.child_process import run_for_result

TAU, BATCH, SIZE = 3, 2, 4
FIELDS = ("images", "labels", "adversarial")


def slot_values(base: float):
    """Distinct (images, labels, adversarial) for one slot, derived from ``base``."""
    images = base + np.arange(BATCH * SIZE * SIZE * 3, dtype=np.float32).reshape(
        BATCH, SIZE, SIZE, 3
    )
    labels = (int(base) + np.arange(BATCH)).astype(np.int32)
    return images, labels, images + 0.5


def whole_ring_tensors(graph, ring: RingBuffer) -> list[str]:
    """Names of the ops in ``graph`` that produce a tensor shaped like a whole ring array."""
    shapes = {tuple(ring.image_shape), (ring.staleness, ring.per_replica_batch)}
    return [
        op.name
        for op in graph.get_operations()
        for out in op.outputs
        if out.shape.rank is not None and tuple(out.shape.as_list()) in shapes
    ]


class RingBufferTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.strategy = tf.distribute.get_strategy()
        self.ring = RingBuffer(self.strategy, TAU, BATCH, SIZE)

        @tf.function
        def write(slot, images, labels, adversarial):
            self.strategy.run(lambda: self.ring.write(slot, images, labels, adversarial))

        @tf.function
        def read(slot):
            return self.strategy.run(lambda: self.ring.read(slot))

        self.write, self.read = write, read
        for slot in range(TAU):
            self.write(tf.constant(slot), *slot_values(100.0 * (slot + 1)))

    def stored(self):
        return {name: self.ring.local_slots(name)[0].numpy().copy() for name in FIELDS}

    def test_write_sets_its_slot_and_leaves_the_others_bit_identical(self):
        for slot in range(TAU):
            before = self.stored()
            new = slot_values(1000.0 + slot)
            self.write(tf.constant(slot), *new)
            after = self.stored()
            for name, value in zip(FIELDS, new):
                expected = before[name].copy()
                expected[slot] = value
                self.assertAllEqual(after[name], expected, msg=f"{name}, slot {slot}")
                # The reference differs from the old contents: the check can fail.
                self.assertFalse(np.array_equal(expected, before[name]))

    def test_read_returns_the_slot_asked_for(self):
        for slot in range(TAU):
            for got, want in zip(self.read(tf.constant(slot)), slot_values(100.0 * (slot + 1))):
                self.assertAllEqual(got, want, msg=f"slot {slot}")

    def test_read_then_write_in_one_xla_program(self):
        """The ConAdv step's pattern: read slot k, overwrite it; the read sees the old batch."""

        @tf.function(jit_compile=True)
        def swap(slot, images, labels, adversarial):
            old = self.ring.read(slot)
            with tf.control_dependencies(old):
                self.ring.write(slot, images, labels, adversarial)
            return old

        before = self.stored()
        new = slot_values(5000.0)
        old = swap(tf.constant(2), *new)
        after = self.stored()
        for name, got, value in zip(FIELDS, old, new):
            self.assertAllEqual(got, before[name][2], msg=name)
            expected = before[name].copy()
            expected[2] = value
            self.assertAllEqual(after[name], expected, msg=name)

    def test_no_whole_ring_tensor_in_a_traced_read_and_write(self):
        @tf.function
        def step(slot, images, labels, adversarial):
            def fn():
                old = self.ring.read(slot)
                with tf.control_dependencies(old):
                    self.ring.write(slot, images, labels, adversarial)
                return old

            return self.strategy.run(fn)

        graph = step.get_concrete_function(tf.constant(0), *slot_values(1.0)).graph
        self.assertEqual(whole_ring_tensors(graph, self.ring), [])

    def test_images_are_stored_in_the_buffer_dtype(self):
        ring = RingBuffer(self.strategy, TAU, BATCH, SIZE, dtype=tf.bfloat16)
        images, labels, adversarial = slot_values(0.3)

        @tf.function
        def write():
            ring.write(tf.constant(1), images, labels, adversarial)

        write()
        stored = ring.local_slots("adversarial")[0].numpy()
        self.assertEqual(stored.dtype, ml_dtypes.bfloat16)
        self.assertAllEqual(stored[1], adversarial.astype(ml_dtypes.bfloat16))
        self.assertAllEqual(stored[0], np.zeros_like(stored[0]))


MIRRORED_PROGRAM = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from conadv.ring_buffer import RingBuffer
from tests.test_ring_buffer import BATCH, FIELDS, SIZE, TAU, slot_values, whole_ring_tensors
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ring = RingBuffer(strategy, TAU, BATCH, SIZE)

@tf.function
def swap(slot, base):
    def fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        values = [tf.constant(v) for v in slot_values(0.0)]
        # Each replica writes its own values: base + 10 * replica.
        offset = base + 10.0 * tf.cast(replica, tf.float32)
        images = values[0] + offset
        labels = values[1] + tf.cast(offset, tf.int32)
        old = ring.read(slot)
        with tf.control_dependencies(old):
            ring.write(slot, images, labels, images + 0.5)
        return old
    return strategy.run(fn)

def local(values):
    return [t.numpy().tolist() for t in strategy.experimental_local_results(values)]

for slot in range(TAU):
    swap(tf.constant(slot), tf.constant(100.0 * (slot + 1)))
before = {n: [v.numpy().tolist() for v in ring.local_slots(n)] for n in FIELDS}
old = swap(tf.constant(1), tf.constant(1000.0))
after = {n: [v.numpy().tolist() for v in ring.local_slots(n)] for n in FIELDS}
graph = swap.get_concrete_function(tf.constant(0), tf.constant(0.0)).graph
print("RESULT " + json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "before": before,
    "after": after,
    "read": {n: local(t) for n, t in zip(FIELDS, old)},
    "whole_ring_tensors": whole_ring_tensors(graph, ring),
}))
"""


class MirroredRingBufferTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.result = run_for_result("-c", MIRRORED_PROGRAM)

    def expected(self, base: float, replica: int):
        """What replica ``replica`` wrote with ``base`` (NumPy, as the program computes it)."""
        images, labels, _ = slot_values(0.0)
        offset = base + 10.0 * replica
        return images + offset, labels + int(offset), images + offset + 0.5

    def test_each_replica_slot_holds_its_own_value(self):
        self.assertEqual(self.result["replicas"], 2)
        for replica in range(2):
            for slot in range(TAU):
                base = 1000.0 if slot == 1 else 100.0 * (slot + 1)
                for name, want in zip(FIELDS, self.expected(base, replica)):
                    got = np.array(self.result["after"][name][replica][slot])
                    self.assertAllEqual(got, want, msg=f"{name}, replica {replica}, slot {slot}")
        # The replicas hold different values: a write to every replica's copy would fail.
        self.assertNotAllEqual(
            np.array(self.result["after"]["images"][0]), np.array(self.result["after"]["images"][1])
        )

    def test_each_replica_reads_its_own_old_slot(self):
        for replica in range(2):
            for name, want in zip(FIELDS, self.expected(200.0, replica)):
                got = np.array(self.result["read"][name][replica])
                self.assertAllEqual(got, want, msg=f"{name}, replica {replica}")

    def test_other_slots_are_bit_identical(self):
        for name in FIELDS:
            for replica in range(2):
                before = np.array(self.result["before"][name][replica])
                after = np.array(self.result["after"][name][replica])
                self.assertAllEqual(np.delete(after, 1, axis=0), np.delete(before, 1, axis=0))
                self.assertNotAllEqual(after[1], before[1])

    def test_no_whole_ring_tensor_in_the_replica_step(self):
        self.assertEqual(self.result["whole_ring_tensors"], [])


if __name__ == "__main__":
    tf.test.main()
