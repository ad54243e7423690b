"""`python tests/slow_main.py SECONDS ARGS...`: facekd_jax.main with a pause before each training step, so that a
test can kill or preempt a run mid-way (the product has no such hook)."""
import sys
import time

from facekd_jax import sharding

seconds = float(sys.argv.pop(1))
put_batch = sharding.put_batch


def slow_put_batch(batch, mesh):
    time.sleep(seconds)
    return put_batch(batch, mesh)


sharding.put_batch = slow_put_batch

from facekd_jax import main  # noqa: E402

main.run()
