"""A step that never yields and ignores cancellation: only the kill switch stops it."""


async def spin_forever(ctx, **_):
    while True:
        pass
