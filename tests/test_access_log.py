"""The batching access-log handler: every line written, in order, by ``close`` at the
latest (what ``logging.shutdown`` calls at exit), with the usual format."""

from __future__ import annotations

import io
import logging

from proxy.access_log import LOG_FORMAT, BatchingStreamHandler, log_line


def test_no_line_is_lost_or_reordered_at_close() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval_s=10.0)  # the thread never flushes
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("metergate.access.test-batching")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(1000):
            log_line(logger, f'{{"n": {i}, "pct": "100%"}}')
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1000
    assert all(line.endswith(f'{{"n": {i}, "pct": "100%"}}') for i, line in enumerate(lines))
    assert " INFO metergate.access.test-batching " in lines[0]


def test_flush_writes_what_is_queued() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval_s=10.0)
    logger = logging.getLogger("metergate.access.test-flush")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        log_line(logger, "one")
        handler.flush()
        assert stream.getvalue() == "one\n"
    finally:
        logger.removeHandler(handler)
        handler.close()
