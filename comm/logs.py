"""The one logger setup: loguru to stderr, each line tagged with role and rank.

Rank 0 of each role logs at `level`; other ranks only warn, so a pool of eight
generators does not print everything eight times.
"""
import sys

from loguru import logger

FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> <cyan>{extra[role]}-{extra[rank]}</cyan> {message}"


def setup_logging(role: str, rank: int = 0, level: str = "INFO"):
    logger.remove()
    logger.configure(extra={"role": role, "rank": rank})
    logger.add(sys.stderr, format=FORMAT, level=level if rank == 0 else "WARNING")
    return logger
