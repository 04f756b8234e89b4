"""`housekeeping:prune_attachments` from the spec's resolution table.

The function lives in reports.housekeeping (the layout tree); this package
makes the short reference resolve to the same function.
"""

from reports.housekeeping import prune_attachments

__all__ = ["prune_attachments"]
