"""The two error types of trtc.

`TrtcError` is for what the user can fix: its message names the value, the limit and the fix.
The CLI prints it as one line and exits with code 2. `TrtcInternalError` is for bugs in trtc
(a pass produced an invalid graph, an invariant broke); it keeps its traceback.
"""


class TrtcError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    exit_code = 2


class TrtcInternalError(RuntimeError):
    """A bug in trtc: an invariant that the code itself should have kept."""
