"""Starting or joining Ray for a job, with an embedded local Ray kept on loopback.

With no address, a local Ray is started on this machine; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
makes it single-machine so that every Ray listener binds to 127.0.0.1 only (a plain
``ray.init()`` listens on every interface). With an address (``auto``, ``ray://host:10001`` or a
GCS address), or inside a Ray Job (which sets ``RAY_ADDRESS``), the command joins that cluster and
the environment is left alone.
"""

from __future__ import annotations

import os


def keep_on_loopback() -> None:
    """Make the next local Ray single-machine (every listener on 127.0.0.1).

    Ray reads the variable into ``ray_constants.ENABLE_RAY_CLUSTER`` when it is imported, and the
    driver resolves the node address from that constant; when ``ray`` was imported before this
    call, the constant is updated too so that the driver agrees with the processes it starts.
    """
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started it (so it should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    keep_on_loopback()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,  # on 127.0.0.1; it also serves the state API that Ray Train polls
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        # gloo (torch.distributed on CPU) binds to the interface named here: loopback too
        runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}},
    )
    return True


def shutdown_ray(started: bool) -> None:
    if started:
        import ray

        ray.shutdown()


def gather_with_progress(refs: list, desc: str, unit: str = "task", progress: bool = True,
                         initial: int = 0, total: int | None = None, sizes: list[int] | None = None) -> list:
    """``ray.get`` of every ref, in order, with a progress bar that moves as tasks finish (by each
    task's entry in ``sizes``, e.g. its images, else by one); the unfinished tasks are cancelled if
    this is interrupted or a task fails."""
    import ray
    from tqdm import tqdm

    pending = list(refs)
    position = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    try:
        steps = sizes if sizes is not None else [1] * len(refs)
        with tqdm(total=total if total is not None else sum(steps), initial=initial, desc=desc, unit=unit,
                  disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                results[position[done[0]]] = ray.get(done[0])  # a task's error is raised as soon as it happens
                bar.update(steps[position[done[0]]])
        return results
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
