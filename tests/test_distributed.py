"""Global-batch losses under data parallelism equal the single-process loss.

* torch: ``gloo`` process groups of world size 3 and then 2 (the same three
  spawned processes), uneven local batch sizes, float64, a small MLP student
  under ``DistributedDataParallel``: the loss value on every rank and every
  parameter gradient after ``backward()`` equal the single-process run on
  the concatenated batch; the bytes passed through the collectives are
  counted and shown to be O(dim), independent of the batch size.
* TensorFlow: ``MirroredStrategy`` over 2 logical CPU devices (custom loop
  with uneven shards, and ``model.fit``).
* Keras on JAX: ``keras.distribution.DataParallel`` over 2 host devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), and the core's
  ``all_reduce`` with ``jax.lax.psum`` under ``shard_map``.

Each test starts its own interpreters with the environment it needs (this
file doubles as their entry point: ``python tests/test_distributed.py MODE``)
and runs only in the session of its Keras backend (``KERAS_BACKEND``,
keras' default being tensorflow), so that nox runs each once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TOL = 1e-10  # float64 relative error: loss values and gradients
_ACTIVE = os.environ.get("KERAS_BACKEND", "tensorflow")
_TIMEOUT = 300
_COMPLETE = "ALL-RESULTS-PRINTED"


def _needs(backend: str, module: str) -> pytest.MarkDecorator:
    if _ACTIVE != backend:
        return pytest.mark.skip(reason=f"runs in the {backend} session (KERAS_BACKEND={_ACTIVE})")
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed"
    )


def _env(backend: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="2",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    return env


def _results(stdout: str) -> list[dict]:
    return [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def _launch(mode: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), mode, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> list[dict]:
    try:
        out, err = proc.communicate(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    # A rank that printed every result but then hung in gloo's teardown (seen
    # once on a loaded CI machine) and was killed at the timeout still counts.
    finished = proc.returncode == 0 or (proc.returncode == -9 and _COMPLETE in out)
    assert finished, f"exit {proc.returncode}\n{out[-4000:]}\n{err[-4000:]}"
    return _results(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _grad_rel(grads: list, ref_grads: list) -> float:
    """Max abs error over all parameters / max abs reference gradient.

    Relative to the whole gradient, not per tensor: CKD is invariant to a
    common shift of the student outputs, so the last bias' exact gradient is
    0 and only rounding noise remains there.
    """
    assert len(grads) == len(ref_grads)
    flat = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in grads])
    ref = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in ref_grads])
    return _rel(flat, ref)


def _data(total: int, d_in: int, d_out: int, seed: int = 123) -> tuple[np.ndarray, ...]:
    """Inputs, teacher outputs (with a common offset) and sample weights."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(total, d_in))
    teacher = rng.normal(size=(total, d_out)) + 3.0
    weights = rng.uniform(0.2, 2.0, size=total)
    return x, teacher, weights


# ------------------------------------------------- core, in-process replicas


class _ThreadReplicas:
    """``all_reduce`` for replicas simulated by threads (values only)."""

    def __init__(self, count: int) -> None:
        import threading

        self.barrier = threading.Barrier(count)
        self.slots: list = [None] * count

    def all_reduce(self, rank: int):
        from keras import ops

        def reduce(x):
            self.slots[rank] = ops.convert_to_numpy(x)
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0])  # same order on every replica
            self.barrier.wait()
            return ops.convert_to_tensor(total, dtype=x.dtype)

        return reduce

    def all_gather(self, rank: int):
        from keras import ops

        def gather(x):
            self.slots[rank] = ops.convert_to_numpy(x)
            self.barrier.wait()
            rows = np.concatenate(self.slots, axis=0)
            self.barrier.wait()
            return ops.convert_to_tensor(rows, dtype=x.dtype)

        return gather


@pytest.mark.parametrize("sizes", [[3, 4], [5, 0, 2], [1, 1, 1, 1]])
def test_core_all_gather_rkd_equals_concatenated_batch(sizes: list[int]) -> None:
    """RKD with the core's ``all_gather`` hook equals RKD of the whole batch on every replica."""
    from concurrent.futures import ThreadPoolExecutor

    import keras

    import ckd_core

    x, teacher, _ = _data(sum(sizes), 5, D_OUT)
    student = np.tanh(x[:, :D_OUT] * 2 + 1)
    bounds = np.cumsum([0, *sizes])
    replicas = _ThreadReplicas(len(sizes))

    def run(rank: int) -> float:
        part = slice(bounds[rank], bounds[rank + 1])
        loss = ckd_core.RKDLoss(all_gather=replicas.all_gather(rank))
        return float(keras.ops.convert_to_numpy(loss(teacher[part], student[part])))

    with ThreadPoolExecutor(len(sizes)) as pool:
        values = list(pool.map(run, range(len(sizes))))
    expected = float(keras.ops.convert_to_numpy(ckd_core.RKDLoss()(teacher, student)))
    tol = 1e-5 if keras.backend.backend() == "numpy" else TOL
    for value in values:
        assert _rel(value, expected) <= tol, (value, expected)


@pytest.mark.parametrize("sizes", [[3, 4], [5, 0, 2], [1, 1, 1, 1], [7]])
@pytest.mark.parametrize("weighted", [False, True])
def test_core_all_reduce_equals_concatenated_batch(sizes: list[int], weighted: bool) -> None:
    """Every replica's ``all_reduce`` loss equals the loss of the whole batch."""
    from concurrent.futures import ThreadPoolExecutor

    import keras

    from ckd_core import functional

    x, teacher, weights = _data(sum(sizes), 5, D_OUT)
    student = x[:, :D_OUT] * 2 + 1
    w = weights if weighted else None
    projection = functional.make_projection(D_OUT, 2)
    bounds = np.cumsum([0, *sizes])
    replicas = _ThreadReplicas(len(sizes))

    def run(rank: int) -> tuple[float, float]:
        part = slice(bounds[rank], bounds[rank + 1])
        reduce = replicas.all_reduce(rank)
        local_w = None if w is None else w[part]
        ckd = functional.comparative_loss(teacher[part], student[part], local_w, all_reduce=reduce)
        proj = functional.projected_rkd_loss(
            teacher[part], student[part], projection, local_w, all_reduce=reduce
        )
        return float(keras.ops.convert_to_numpy(ckd)), float(keras.ops.convert_to_numpy(proj))

    with ThreadPoolExecutor(len(sizes)) as pool:
        values = list(pool.map(run, range(len(sizes))))
    whole = functional.comparative_loss(teacher, student, w)
    # Keras' numpy backend computes several float64 ops (square, where) in float32.
    exact = keras.backend.standardize_dtype(whole.dtype) == "float64"
    tol = TOL if exact and keras.backend.backend() != "numpy" else 1e-5
    expected = (
        float(keras.ops.convert_to_numpy(whole)),
        float(
            keras.ops.convert_to_numpy(
                functional.projected_rkd_loss(teacher, student, projection, w)
            )
        ),
    )
    for value in values:
        assert _rel(value, expected) <= tol, (value, expected)


# --------------------------------------------------------------------- torch

TORCH_SIZES = {3: [6, 1, 4], 2: [5, 9]}  # uneven local batches (one of size 1)
D_IN, D_OUT = 4, 3


def _torch_rank(rank: int, ports: list[int]) -> None:
    """One rank: world size 3 (ranks 0-2), then world size 2 (ranks 0-1)."""
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist
    from ckd_torch import ComparativeLoss, ProjectedRKDLoss, RKDLoss
    from ckd_torch.distributed import gather_rows
    from torch.nn.parallel import DistributedDataParallel

    counter = {"bytes": 0, "calls": 0}
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def counting_all_reduce(tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        counter["calls"] += 1
        return real_all_reduce(tensor, *args, **kwargs)

    def counting_all_gather(tensor_list, tensor, *args, **kwargs):
        counter["bytes"] += sum(t.numel() * t.element_size() for t in tensor_list)
        counter["calls"] += 1
        return real_all_gather(tensor_list, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = counting_all_reduce, counting_all_gather

    def make_student() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(D_IN, 8), torch.nn.Tanh(), torch.nn.Linear(8, D_OUT)
        ).double()

    def cases(global_batch: bool) -> dict:
        ckd = ComparativeLoss(global_batch=global_batch)
        proj = ProjectedRKDLoss(out_dim=2, global_batch=global_batch)
        rkd = RKDLoss(global_batch=global_batch)
        return {
            "ckd": lambda s, t, w: ckd(s, t),
            "ckd_weighted": lambda s, t, w: ckd(s, t, sample_weight=w),
            "projected": lambda s, t, w: proj(s, t),
            "ckd+projected": lambda s, t, w: ckd(s, t) + 0.5 * proj(s, t, sample_weight=w),
            "rkd": lambda s, t, w: rkd(s, t),
        }

    for world, port in zip((3, 2), ports, strict=True):
        if rank >= world:
            break
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        sizes = TORCH_SIZES[world]
        x, teacher, weights = (torch.from_numpy(a) for a in _data(sum(sizes), D_IN, D_OUT))
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        reference_model = make_student()
        ddp_model = DistributedDataParallel(make_student())
        reference, distributed = cases(False), cases(True)
        for name in reference:
            reference_model.zero_grad()
            ref_loss = reference[name](reference_model(x), teacher, weights)
            ref_loss.backward()
            ddp_model.zero_grad()
            counter["bytes"] = counter["calls"] = 0
            loss = distributed[name](ddp_model(x[lo:hi]), teacher[lo:hi], weights[lo:hi])
            loss.backward()
            grads = [p.grad for p in ddp_model.module.parameters()]
            ref_grads = [p.grad for p in reference_model.parameters()]
            result = {
                "world": world,
                "rank": rank,
                "case": name,
                "loss": float(loss),
                "loss_rel_err": _rel(loss.detach().numpy(), ref_loss.detach().numpy()),
                "grad_rel_err": _grad_rel(
                    [g.numpy() for g in grads], [r.numpy() for r in ref_grads]
                ),
                "bytes": counter["bytes"],
                "collectives": counter["calls"],
            }
            print("RESULT " + json.dumps(result), flush=True)

        # Communication per call vs local batch size (float32, no autograd
        # graph needed beyond the loss): CKD all-reduces O(dim) numbers,
        # RKD all-gathers the embeddings.
        for n, d in ((8, 100), (512, 100), (4096, 100), (4096, 10)):
            gen = torch.Generator().manual_seed(rank)
            s = torch.randn(n, d, generator=gen, requires_grad=True)
            t = torch.randn(n, d, generator=gen)
            for name, fn in (
                ("ckd", lambda s, t: ComparativeLoss(global_batch=True)(s, t)),
                ("gather_embeddings", lambda s, t: gather_rows(s).sum() + gather_rows(t).sum()),
            ):
                counter["bytes"] = counter["calls"] = 0
                fn(s, t).backward()
                print(
                    "RESULT "
                    + json.dumps(
                        {
                            "world": world,
                            "rank": rank,
                            "bytes_case": name,
                            "n": n,
                            "d": d,
                            "bytes": counter["bytes"],
                            "collectives": counter["calls"],
                        }
                    ),
                    flush=True,
                )
        print(_COMPLETE, flush=True)
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def torch_results() -> list[dict]:
    ports = [str(_free_port()), str(_free_port())]
    env = _env("torch")
    procs = [_launch("torch-rank", str(rank), *ports, env=env) for rank in range(3)]
    return [row for proc in procs for row in _finish(proc)]


@_needs("torch", "torch")
@pytest.mark.parametrize("world", [2, 3])
def test_torch_ddp_equals_single_process(torch_results: list[dict], world: int) -> None:
    rows = [r for r in torch_results if r["world"] == world and "case" in r]
    cases = {"ckd", "ckd_weighted", "projected", "ckd+projected", "rkd"}
    assert {(r["rank"], r["case"]) for r in rows} == {
        (rank, case) for rank in range(world) for case in cases
    }
    for r in rows:
        assert r["loss_rel_err"] <= TOL, r
        assert r["grad_rel_err"] <= TOL, r


@_needs("torch", "torch")
def test_torch_collective_bytes_are_o_dim(torch_results: list[dict]) -> None:
    rows = [r for r in torch_results if "case" in r]
    by_case = {(r["world"], r["case"]): r for r in rows if r["rank"] == 0}
    for world in (2, 3):
        # float64, d=3: forward the summed peak (1), [count, sum e] (d+1) and the
        # centred scalar; backward the gradients of the last two (d+1, 1).
        assert by_case[world, "ckd"]["bytes"] == 8 * (2 * D_OUT + 5)
        assert by_case[world, "ckd"]["collectives"] == 5
        # with sample weights: peaks of e and w (2), [sum w, sum w^2, sum w e] (d+2)
        # and the scalar; backward d+2 and 1.
        assert by_case[world, "ckd_weighted"]["bytes"] == 8 * (2 * D_OUT + 8)
    sizes = [r for r in torch_results if r.get("bytes_case") == "ckd"]
    for r in sizes:  # O(d): independent of n, 4-byte floats
        assert r["bytes"] == 4 * (2 * r["d"] + 5), r
    gathers = [r for r in torch_results if r.get("bytes_case") == "gather_embeddings"]
    for r in gathers:  # two (world * n, d) gathers plus their sizes
        assert r["bytes"] == 2 * (r["world"] * r["n"] * r["d"] * 4 + 8 * r["world"]), r
    for r in sizes + gathers:
        if r["rank"] == 0 and r["n"] == 4096 and r["d"] == 100:
            print(f"world={r['world']} n=4096/rank d=100 {r['bytes_case']}: {r['bytes']} B/step")


# ---------------------------------------------------------------- tensorflow

TF_SIZES = [5, 9]


def _tf_main() -> None:
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
    import keras
    from ckd_tensorflow import (
        ComparativeLoss,
        ProjectedRKDLoss,
        RKDLoss,
        replica_gather,
        replica_sum,
    )

    keras.config.set_floatx("float64")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    replicas = strategy.num_replicas_in_sync
    assert replicas == 2

    def make_student() -> keras.Model:
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((D_IN,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(D_OUT)]
        )

    def cases(all_reduce) -> dict:
        ckd = ComparativeLoss(all_reduce=all_reduce)
        proj = ProjectedRKDLoss(out_dim=2, all_reduce=all_reduce)
        rkd = RKDLoss(all_gather=None if all_reduce is None else replica_gather)
        return {
            "ckd": lambda t, s, w: ckd(t, s),
            "ckd_weighted": lambda t, s, w: ckd(t, s, w),
            "projected": lambda t, s, w: proj(t, s, w),
            "rkd": lambda t, s, w: rkd(t, s),
        }

    x, teacher, weights = _data(sum(TF_SIZES), D_IN, D_OUT)
    reference_model = make_student()
    with strategy.scope():
        model = make_student()
    model.set_weights(reference_model.get_weights())
    bounds = np.cumsum([0, *TF_SIZES])

    def shard(a: np.ndarray):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(
                a[bounds[ctx.replica_id_in_sync_group] : bounds[ctx.replica_id_in_sync_group + 1]]
            )
        )

    reference, distributed = cases(None), cases(replica_sum)
    for name in reference:
        with tf.GradientTape() as tape:
            ref_loss = reference[name](teacher, reference_model(x), weights)
        ref_grads = tape.gradient(ref_loss, reference_model.trainable_variables)

        @tf.function
        def step(xs, ts, ws, fn=distributed[name]):
            def replica_fn(x_r, t_r, w_r):
                with tf.GradientTape() as tape:
                    # The global-batch loss / replicas (Keras' per-replica scaling).
                    loss = fn(t_r, model(x_r), w_r)
                return loss, tape.gradient(loss, model.trainable_variables)

            losses, grads = strategy.run(replica_fn, args=(xs, ts, ws))
            summed = [strategy.reduce("SUM", g, axis=None) for g in grads]
            local = [v * replicas for v in strategy.experimental_local_results(losses)]
            return [strategy.reduce("SUM", losses, axis=None), *local], summed

        losses, grads = step(shard(x), shard(teacher), shard(weights))
        result = {
            "case": name,
            "loss_rel_err": max(_rel(v.numpy(), ref_loss.numpy()) for v in losses),
            "grad_rel_err": _grad_rel([g.numpy() for g in grads], [r.numpy() for r in ref_grads]),
        }
        print("RESULT " + json.dumps(result), flush=True)

    # model.fit recipe: one SGD step on one batch (Keras splits the batch
    # evenly, scales the loss by 1/replicas and sums the replicas' gradients).
    # Not train_on_batch: it feeds the whole batch to every replica.
    lr = 0.5
    reference_model.compile(optimizer=keras.optimizers.SGD(lr), loss=ComparativeLoss())
    with strategy.scope():
        model.compile(
            optimizer=keras.optimizers.SGD(lr), loss=ComparativeLoss(all_reduce=replica_sum)
        )
    model.set_weights(reference_model.get_weights())
    before = reference_model.get_weights()
    fit = {"batch_size": len(x), "epochs": 1, "shuffle": False, "verbose": 0}
    ref_loss = reference_model.fit(x, teacher, **fit).history["loss"][0]
    loss = model.fit(x, teacher, **fit).history["loss"][0]
    steps = [(b - a) / lr for a, b in zip(reference_model.get_weights(), before, strict=True)]
    dist_steps = [(b - a) / lr for a, b in zip(model.get_weights(), before, strict=True)]
    result = {
        "case": "model.fit",
        "loss_rel_err": _rel(loss, ref_loss),
        "grad_rel_err": _grad_rel(dist_steps, steps),
    }
    print("RESULT " + json.dumps(result), flush=True)


@_needs("tensorflow", "tensorflow")
def test_tf_mirrored_strategy_equals_single_device() -> None:
    rows = _finish(_launch("tf", env=_env("tensorflow")))
    assert {r["case"] for r in rows} == {"ckd", "ckd_weighted", "projected", "rkd", "model.fit"}
    for r in rows:
        assert r["loss_rel_err"] <= TOL, r
        # model.fit: gradients recovered from an SGD step, (w0 - w1) / lr.
        assert r["grad_rel_err"] <= (1e-9 if r["case"] == "model.fit" else TOL), r


# ----------------------------------------------------------------------- jax


def _jax_main() -> None:
    import jax

    assert len(jax.devices()) == 2, jax.devices()
    import keras
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import ckd_core
    from ckd_core import functional

    keras.config.set_floatx("float64")
    total = 14
    x, teacher, weights = _data(total, D_IN, D_OUT)

    shardings: list = []

    class SpyLoss(ckd_core.ComparativeLoss):
        """Records how the jit-compiled train step shards the student outputs."""

        def call(self, y_true, y_pred, sample_weight=None):
            jax.debug.inspect_array_sharding(y_pred, callback=shardings.append)
            return super().call(y_true, y_pred, sample_weight)

    def make_student() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((D_IN,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(D_OUT)]
        )
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=SpyLoss())
        return model

    # Single device reference: loss and one SGD step (lr=1: the step is the gradient).
    reference = make_student()
    before = reference.get_weights()
    ref_loss = reference.train_on_batch(x, teacher)
    ref_grads = [a - b for a, b in zip(before, reference.get_weights(), strict=True)]

    distribution = keras.distribution.DataParallel(devices=jax.devices())
    keras.distribution.set_distribution(distribution)
    model = make_student()
    shardings.clear()
    loss = model.train_on_batch(x, teacher)
    # The loss saw the batch split over both devices, and its sums were global.
    assert shardings and all(len(s.device_set) == 2 for s in shardings), shardings
    assert not any(s.is_fully_replicated for s in shardings), shardings
    grads = [a - b for a, b in zip(before, model.get_weights(), strict=True)]
    print(
        "RESULT "
        + json.dumps(
            {
                "case": "DataParallel model.fit",
                "loss_rel_err": _rel(loss, ref_loss),
                "grad_rel_err": _grad_rel(grads, ref_grads),
            }
        ),
        flush=True,
    )
    keras.distribution.set_distribution(None)

    # The core's all_reduce under shard_map: explicit per-device shards, psum.
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    spec = PartitionSpec("batch")

    def local_loss(t, s, w):
        loss = functional.comparative_loss(t, s, w, all_reduce=lambda v: jax.lax.psum(v, "batch"))
        return loss[None]  # one (identical) value per device

    sharded_loss = jax.jit(
        jax.shard_map(
            local_loss, mesh=mesh, in_specs=(spec, spec, spec), out_specs=PartitionSpec("batch")
        )
    )
    student = x @ np.random.default_rng(1).normal(size=(D_IN, D_OUT))
    put = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (teacher, student, weights)]
    values = sharded_loss(*put)
    ref = functional.comparative_loss(teacher, student, weights)
    grad = jax.grad(lambda s: sharded_loss(put[0], s, put[2]).mean())(put[1])
    ref_grad = jax.grad(lambda s: functional.comparative_loss(teacher, s, weights))(student)
    print(
        "RESULT "
        + json.dumps(
            {
                "case": "shard_map psum",
                "loss_rel_err": max(_rel(v, ref) for v in np.asarray(values)),
                "grad_rel_err": _rel(grad, ref_grad),
            }
        ),
        flush=True,
    )

    # Global-batch RKD under shard_map: the core's all_gather hook.
    rkd = ckd_core.RKDLoss(all_gather=lambda v: jax.lax.all_gather(v, "batch", tiled=True))

    def local_rkd(t, s):
        return rkd(t, s)[None]

    sharded_rkd = jax.jit(
        jax.shard_map(local_rkd, mesh=mesh, in_specs=(spec, spec), out_specs=PartitionSpec("batch"))
    )
    rkd_values = sharded_rkd(put[0], put[1])
    rkd_ref = ckd_core.RKDLoss()(teacher, student)
    rkd_grad = jax.grad(lambda s: sharded_rkd(put[0], s).mean())(put[1])
    rkd_ref_grad = jax.grad(lambda s: ckd_core.RKDLoss()(teacher, s))(student)
    print(
        "RESULT "
        + json.dumps(
            {
                "case": "shard_map all_gather rkd",
                "loss_rel_err": max(_rel(v, rkd_ref) for v in np.asarray(rkd_values)),
                "grad_rel_err": _rel(rkd_grad, rkd_ref_grad),
            }
        ),
        flush=True,
    )


@_needs("jax", "jax")
def test_jax_data_parallel_equals_single_device() -> None:
    env = _env(
        "jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_ENABLE_X64="1",
    )
    rows = _finish(_launch("jax", env=env))
    assert {r["case"] for r in rows} == {
        "DataParallel model.fit",
        "shard_map psum",
        "shard_map all_gather rkd",
    }
    for r in rows:
        assert r["loss_rel_err"] <= TOL, r
        assert r["grad_rel_err"] <= TOL, r


if __name__ == "__main__":
    _started = time.perf_counter()
    _mode = sys.argv[1]
    if _mode == "torch-rank":
        _torch_rank(int(sys.argv[2]), [int(p) for p in sys.argv[3:5]])
    elif _mode == "tf":
        _tf_main()
    elif _mode == "jax":
        _jax_main()
    else:
        raise SystemExit(f"unknown mode {_mode!r}")
    print(f"# {_mode} done in {time.perf_counter() - _started:.1f} s", file=sys.stderr)
