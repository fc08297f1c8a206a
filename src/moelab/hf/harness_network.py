"""Telling a failed download inside lm-eval (a hub task's data, no network) from any other
failure, and the one-line hint ``moelab lm-eval`` gives for it instead of a traceback."""

from __future__ import annotations

# what the datasets / hub / requests stack raises without network or in offline mode
_NETWORK_ERRORS = {
    "ConnectionError",  # builtin (datasets' "Couldn't reach ...") and requests' own
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "Timeout",
    "MaxRetryError",
    "NewConnectionError",
}


def is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a failed download."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def download_hint(tasks: list[str], err: BaseException) -> str:
    """One line: which task's data could not be fetched, and the two ways to run it offline."""
    first = (str(err).strip().splitlines() or [""])[0][:160]
    names = ", ".join(tasks) or "the task"
    return (
        f"lm-eval: the data of {names} could not be downloaded ({type(err).__name__}: {first}); "
        "run it once on a machine with network to fill the Hugging Face datasets cache "
        "(HF_HOME, default ~/.cache/huggingface) and copy that cache here (with "
        "HF_DATASETS_OFFLINE=1), or describe the task over local files in a YAML and give its "
        "folder with --include-path"
    )
