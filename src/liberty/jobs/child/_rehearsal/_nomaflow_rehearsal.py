"""Imported, fresh from source, by every spare while it waits for its step (`loader.rehearse_import`)."""


async def step(ctx, **_):
    return None
