"""``python -m services.simulator``: serve the simulator until SIGTERM or SIGINT, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from shared.logs import configure_logging
from shared.service import new_event_loop
from shared.settings import SettingsError

from . import SimulatorConfig, load_simulator_config, running_simulator

log = logging.getLogger("services.simulator")


async def serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_simulator(config) as url:
        # API keys are never logged; /admin/agents lists them for tooling.
        log.info(
            "simulator listening",
            extra={
                "url": url,
                "seed": config.seed,
                "agents": config.agents,
                "backlog": config.backlog,
                "rate": config.rate,
            },
        )
        await stop.wait()
    log.info("simulator stopped")


def main() -> int:
    configure_logging("simulator")
    try:
        # Serving reads (or first writes) PFLEA_SIM_STATE_DIR: a bad one also fails here.
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(serve(load_simulator_config()))
    except SettingsError as exc:
        log.error("bad configuration: %s", exc, extra={"variable": exc.variable})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
