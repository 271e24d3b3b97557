"""The one exception type the CLI turns into a single line and exit code 2."""


class NFTError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name.

    The CLI prints ``nft: error: <message>`` and exits with status 2; no traceback.
    """
