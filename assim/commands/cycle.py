"""``assim cycle``: run one nightly forecast cycle, or catch up on missed ones.

Exit codes: 0 done, skipped (already complete) or forecast-only (warning); 2 bad
config or arguments; 65 bad observation/restart data (EX_DATAERR); 66 previous
restart missing with cold start disabled (EX_NOINPUT); 75 another run holds the
lock (EX_TEMPFAIL: cron/systemd simply try again at the next tick).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL = 65, 66, 75


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="cycle configuration (TOML)")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--cycle", metavar="TIME", help="cycle time, e.g. 2026-11-26T00 (UTC)")
    when.add_argument(
        "--catch-up",
        action="store_true",
        help="run every missed cycle up to now (or --until), oldest first",
    )
    parser.add_argument("--until", metavar="TIME", help="last cycle time for --catch-up")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def _handlers(out, level: str) -> list[logging.Handler]:
    fmt = logging.Formatter(
        "%(asctime)sZ %(levelname)s [pid %(process)d] %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    fmt.converter = time.gmtime
    out.mkdir(parents=True, exist_ok=True)
    handlers = [
        logging.StreamHandler(sys.stderr),
        logging.FileHandler(out / "cycle.log", encoding="utf-8"),
    ]
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(level)
    return handlers


def run(args: argparse.Namespace) -> int:
    # light imports first: the lock is taken before torch is imported
    from assim.cycle_config import load_config, parse_cycle_time
    from assim.cycle_store import CycleLock, LockBusy
    from assim.errors import InputError

    if args.until and not args.catch_up:
        raise InputError("--until only goes with --catch-up")
    cfg = load_config(args.config)
    t = parse_cycle_time(args.cycle) if args.cycle else None
    until = parse_cycle_time(args.until) if args.until else None

    logger = logging.getLogger("assim.cycle")
    handlers = _handlers(cfg.output, args.log_level)
    old_level = logger.level
    logger.setLevel(args.log_level)
    for h in handlers:
        logger.addHandler(h)
    try:
        with CycleLock(cfg.output):
            import torch

            from assim import cycle as cyc

            torch.set_num_threads(cfg.threads)
            if t is not None:
                cyc.run_cycle(cfg, t, lock=False)
            else:
                cyc.catch_up(cfg, until, lock=False)
        return 0
    except LockBusy as exc:
        logger.error("%s; exiting with %d", exc, EX_TEMPFAIL)
        return EX_TEMPFAIL
    except InputError as exc:
        from assim.cycle import MissingRestart
        from assim.cycle_files import DataError

        logger.error("%s", exc)
        if isinstance(exc, DataError):
            return EX_DATAERR
        if isinstance(exc, MissingRestart):
            return EX_NOINPUT
        raise
    except Exception:
        logger.exception("cycle failed unexpectedly")
        raise
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
