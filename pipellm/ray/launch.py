"""``python -m pipellm.ray --config X.yml``: the driver. It checks the config, places one Ray worker per rank,
checks that every node sees the run's files and that ``save_path`` is shared, starts the ranks with the
launcher's rendezvous variables, prints rank 0's output and every rank's ``error:`` lines, and exits with the
training's exit code.

1. The config gets the checks ``train_ds.py`` runs before any process group (``prepare``, the objective), for a
   world of ``P x D`` processes, before Ray is even imported: a bad config is one line and exit code 2.
2. A placement group holds one bundle per rank (1 CPU, ``--gpus-per-worker`` GPUs; ``PACK``: as few nodes as
   fit). Ranks follow the deepspeed launcher's order: nodes one after another (in the order of their first
   bundle), a node's workers consecutive, sorted by GPU, so ``LOCAL_RANK`` k drives the node's k-th GPU as under
   the launcher (``CUDA_VISIBLE_DEVICES`` is the node's GPUs). ``dims`` maps ranks to stages and replicas as it
   does under the launcher.
3. Every worker checks its node has the working directory, the same config file, the model and the data; every
   worker writes a probe file into ``save_path`` and every worker reads all of them: a node that does not see one
   is named in one line, exit code 2, before training.
4. ``MASTER_ADDR`` is rank 0's node, ``MASTER_PORT`` a free port there. A rank that fails is reported with its
   stage, node, exit code and log file (the first one with its last lines); its peers end with pipellm's
   peer-lost or stall line, and ranks still running ``GRACE_S`` after the first failure are stopped. Ctrl-C or
   SIGTERM sends the ranks SIGTERM (they save a checkpoint and stop; ``resume: auto`` continues); a second one
   kills them.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from pipellm.config import TrainConfig
from pipellm.errors import PipellmError

GRACE_S = 30.0
"""How long ranks still running after another rank failed are given to end on their own (pipellm's peer-lost
error comes at once) before they are stopped."""
PLACEMENT_TIMEOUT_S = 600.0
"""How long to wait for the cluster to make room for the workers (an autoscaler may be adding nodes)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipellm.ray", description=(
        "Train with pipeline parallelism on a Ray cluster (no ssh, no hostfile): one Ray worker per rank, "
        "P x D ranks as the config's model_topo dims say, running what train_ds.py runs."))
    parser.add_argument("--config", required=True, help="training YAML (pipellm and DeepSpeed keys)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: auto (the one on this node), HOST:PORT or ray://HOST:10001; "
                             "default: RAY_ADDRESS, else a new local cluster")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="workers to start; must equal P x D of the config's dims (default: P x D)")
    parser.add_argument("--gpus-per-worker", type=int, choices=(0, 1), default=1,
                        help="1: one worker per GPU (default); 0: CPU workers (gloo)")
    return parser.parse_args(argv)


def check_config(args: argparse.Namespace) -> TrainConfig:
    """The checks ``train_ds.py`` runs before any process group, for the world the Ray workers will make."""
    from pipellm.config import load_config
    from pipellm.training.objective import build_objective
    from pipellm.training.train import prepare

    cfg = load_config(args.config)
    world = cfg.pipe_degree * cfg.data_degree
    if args.num_workers is not None and args.num_workers != world:
        raise PipellmError(f"--num-workers {args.num_workers} but `model_topo.process_topology.dims` "
                           f"{cfg.model_topo.process_topology.dims} of {args.config} needs {world} workers "
                           f"(stages x replicas); leave --num-workers out or change `dims`")
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)  # what the workers' ranks will see
    try:
        cfg, _ = prepare(["--config", args.config])
        build_objective(cfg)
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved
    return cfg


def rank_order(places: list[dict]) -> list[int]:
    """Worker indices in rank order: nodes in the order of their first worker, a node's workers consecutive
    and sorted by their GPU (the deepspeed launcher's order over a hostfile)."""
    first = {}
    for index, place in enumerate(places):
        first.setdefault(place["node_id"], index)
    return sorted(range(len(places)), key=lambda i: (first[places[i]["node_id"]], places[i]["gpus"], i))


def rank_environments(places: list[dict], master_addr: str, master_port: int) -> list[dict[str, str | None]]:
    """The variables the deepspeed launcher sets, for each rank (``places`` in rank order)."""
    node_of = [place["node_id"] for place in places]
    nodes = list(dict.fromkeys(node_of))
    environments = []
    for rank, node in enumerate(node_of):
        peers = [peer for peer, its_node in enumerate(node_of) if its_node == node]
        gpus = sorted(gpu for peer in peers for gpu in places[peer]["gpus"])
        environments.append({
            "RANK": str(rank), "WORLD_SIZE": str(len(places)), "LOCAL_RANK": str(peers.index(rank)),
            "LOCAL_SIZE": str(len(peers)), "CROSS_RANK": str(nodes.index(node)),
            "CROSS_SIZE": str(len(nodes)), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),  # empty: a CPU worker, even on a GPU node
            # Ray sets OMP_NUM_THREADS=1 for its workers; the launcher leaves torch's default.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")})
    return environments


def describe(cfg: TrainConfig, rank: int, place: dict) -> str:
    """``rank 3 (stage 1, replica 1, node host (10.0.0.2))``: where a rank sits in the grid and the cluster."""
    topology = cfg.model_topo.process_topology
    coordinates, rest = {}, rank
    for axis, size in reversed(list(zip(topology.axes, topology.dims))):
        coordinates[axis], rest = rest % size, rest // size
    return (f"rank {rank} (stage {coordinates['pipe']}, replica {coordinates['data']}, node {place['host']} "
            f"({place['ip']}))")


def place_workers(ray, world: int, gpus: int) -> tuple[list, list[dict]]:
    """One worker per rank in a placement group; ``(workers, their places)`` in rank order."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipellm.ray.worker import RankWorker

    bundle = {"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}
    group = placement_group([bundle] * world, strategy="PACK")
    print(f"pipellm ray: placing {world} workers ({bundle} each)", file=sys.stderr, flush=True)
    if not group.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
        raise PipellmError(f"the Ray cluster has not made room for {world} workers of {bundle} within "
                           f"{PLACEMENT_TIMEOUT_S:g}s (free now: {ray.available_resources()}); add nodes, or change "
                           f"`dims` or --gpus-per-worker")
    workers = [RankWorker.options(num_cpus=1, num_gpus=gpus, max_concurrency=2, scheduling_strategy=
                                  PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)).remote()
               for index in range(world)]
    places = ray.get([worker.where.remote() for worker in workers])
    order = rank_order(places)
    return [workers[i] for i in order], [places[i] for i in order]


def check_nodes(ray, cfg: TrainConfig, workers: list, places: list[dict], config: Path) -> None:
    """Every node has the run's files, and every worker sees the probe file every other worker writes into
    ``save_path`` (one line naming the node and the path otherwise)."""
    paths = [cfg.model_path, *cfg.data_paths, *cfg.eval_data_paths]
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    lacks = ray.get([w.missing_file.remote(os.getcwd(), str(config), digest, paths) for w in workers])
    for rank, problem in enumerate(lacks):
        if problem:
            raise PipellmError(f"{describe(cfg, rank, places[rank])}: {problem}; every node needs the same code, "
                               f"config, model and data paths (start from a directory every node has)")
    save_path = Path(cfg.save_path).absolute()
    probes = [str(save_path / f".pipellm-ray-probe-{uuid.uuid4().hex[:8]}-rank{rank}") for rank in range(len(workers))]
    try:
        for rank, problem in enumerate(ray.get([w.write_probe.remote(p) for w, p in zip(workers, probes)])):
            if problem:
                raise PipellmError(f"`save_path` on {describe(cfg, rank, places[rank])}: {problem}")
        for reader, missing in enumerate(ray.get([w.missing_probes.remote(probes) for w in workers])):
            if missing:
                writer = probes.index(missing[0])
                raise PipellmError(
                    f"`save_path` {save_path} is not shared: {describe(cfg, reader, places[reader])} does not see "
                    f"{missing[0]}, written by {describe(cfg, writer, places[writer])}; put save_path on storage "
                    f"every node mounts at the same path (NFS, a ReadWriteMany volume)")
    finally:
        ray.get([w.remove.remote(p) for w, p in zip(workers, probes)])


class Ranks:
    """The running ranks: their output streams, exit codes and the stopping of those left."""

    def __init__(self, ray, cfg: TrainConfig, workers: list, places: list[dict]):
        self.ray, self.cfg, self.workers, self.places = ray, cfg, workers, places
        self.codes: dict[int, int | None] = {}  # None: the worker died without an exit code
        self.first_failure: float | None = None
        self.interrupted = False

    def run(self, argv: list[str]) -> int:
        """Start every rank and stream them to the end; the training's exit code."""
        port = self.ray.get(self.workers[0].free_port.remote())
        environments = rank_environments(self.places, self.places[0]["ip"], port)
        streams = {worker.train.remote(argv + [f"--local_rank={env['LOCAL_RANK']}"], env, os.getcwd(), rank == 0):
                   rank for rank, (worker, env) in enumerate(zip(self.workers, environments))}
        while streams:
            try:
                ready, _ = self.ray.wait(list(streams), num_returns=1, timeout=1.0)
                for stream in ready:
                    if not self.receive(streams[stream], stream):
                        del streams[stream]
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the ranks save a checkpoint and stop; again: killed
                self.stop(signal.SIGKILL if self.interrupted else signal.SIGTERM)
                self.interrupted = True
            if streams and self.first_failure is not None and time.monotonic() - self.first_failure > GRACE_S:
                print(f"pipellm ray: {len(streams)} rank(s) still running {GRACE_S:g}s after the first failure",
                      file=sys.stderr, flush=True)
                self.stop(signal.SIGKILL)
                self.first_failure = float("inf")
        return self.exit_code()

    def receive(self, rank: int, stream) -> bool:
        """Handle the next item of ``rank``'s stream; False when the stream ended."""
        from ray.exceptions import RayActorError

        try:
            item = self.ray.get(next(stream))
        except StopIteration:
            return False
        except RayActorError as err:
            self.fail(rank, None, f"its Ray worker died ({(str(err).splitlines() or [''])[0][:200]})", [])
            return False
        if isinstance(item, str):
            print(item, file=sys.stderr, flush=True)
            return True
        if item["exit"] == 0:
            self.codes[rank] = 0
        else:
            # The first failure's last lines say what happened (rank 0's were all shown); the ranks that fail
            # after it mostly failed for it (their peer-lost lines came through their streams).
            first = self.first_failure is None and rank != 0
            self.fail(rank, item["exit"], f"exited with code {item['exit']}; its log: {item['log']}",
                      item["tail"] if first else [])
        return False

    def fail(self, rank: int, code: int | None, what: str, tail: list[str]) -> None:
        self.codes[rank] = code
        self.first_failure = self.first_failure or time.monotonic()
        last = "".join(f"\n  | {line}" for line in tail)
        print(f"pipellm ray: {describe(self.cfg, rank, self.places[rank])} {what}{last}", file=sys.stderr,
              flush=True)

    def stop(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every rank still running (SIGTERM: checkpoint and stop)."""
        print(f"pipellm ray: sending {sig.name} to the ranks", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):  # a worker that is already gone
            self.ray.get([worker.stop.remote(sig) for worker in self.workers], timeout=30)

    def exit_code(self) -> int:
        """0 when every rank succeeded; else the first non-zero exit code, rank 0's first (a signal N: 128 + N;
        1 when only Ray workers died, without one)."""
        codes = [self.codes.get(rank) for rank in range(len(self.workers))]
        if all(code == 0 for code in codes):
            return 0
        code = next((code for code in codes if code), None)  # rank 0's first: a non-zero exit code
        return 1 if code is None else 128 - code if code < 0 else code


def launch(cfg: TrainConfig, args: argparse.Namespace) -> int:
    try:
        import ray
    except ImportError:
        raise PipellmError("Ray is not installed: pip install 'pipellm[ray]' (or pip install ray) on every node "
                           "and where you start the run") from None
    world = cfg.pipe_degree * cfg.data_degree
    # Ranks' output comes through their streams (rank 0's all, the others' error lines), not Ray's log copy.
    ray.init(address=args.address, log_to_driver=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a job stop: as Ctrl-C, the ranks save and stop
    try:
        workers, places = place_workers(ray, world, args.gpus_per_worker)
        config = Path(args.config).absolute()
        check_nodes(ray, cfg, workers, places, config)
        nodes = len({place["node_id"] for place in places})
        print(f"pipellm ray: {world} ranks on {nodes} node(s); rank 0 on {places[0]['host']} ({places[0]['ip']})",
              file=sys.stderr, flush=True)
        return Ranks(ray, cfg, workers, places).run(["--config", str(config)])
    finally:
        ray.shutdown()


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = check_config(args)
        code = launch(cfg, args)
    except PipellmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the ranks started (they get SIGTERM from their workers' end otherwise)
        print("pipellm ray: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
