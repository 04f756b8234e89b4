"""The spec's "CPU-bound work" example."""

import asyncio
import json
import zlib

from liberty.jobs.types import StepContext


def blocking_pdf_render(data: dict, *, pages: int = 40) -> bytes:
    """Stand-in for a real renderer: synchronous, CPU-bound, deterministic.

    Lays `data` out as text lines per page and deflates each page the way a PDF
    content stream is stored; it holds the CPU for tens of milliseconds.
    """
    text = json.dumps(data, sort_keys=True, default=str)
    out = bytearray(b"%PDF-1.4\n")
    for page in range(1, pages + 1):
        lines = "\n".join(f"({page}.{line}) {text}" for line in range(1, 400))
        content = zlib.compress(lines.encode(), 9)
        out += b"%d 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % (page, len(content))
        out += content + b"\nendstream\nendobj\n"
    out += b"%%EOF\n"
    return bytes(out)


async def render_pdf(ctx: StepContext, *, data: dict, **_) -> dict:
    # Offload to a thread so the event loop stays free.
    pdf_bytes = await asyncio.to_thread(blocking_pdf_render, data)
    return {"bytes": len(pdf_bytes)}
