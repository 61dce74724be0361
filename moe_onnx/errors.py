"""User-facing errors: one readable message, no traceback, non-zero exit."""


class MoeOnnxError(Exception):
    """An expected failure caused by the user's input (bad checkpoint, bad arguments...).

    The CLI prints ``str(err)`` alone and exits with status 2; library users can catch it.
    """


class CheckpointError(MoeOnnxError):
    """The source checkpoint is missing, corrupt, or disagrees with its config."""


class UnsupportedFamilyError(MoeOnnxError):
    """The checkpoint's ``model_type`` has no family module, or uses a feature it does not support."""


class ExportError(MoeOnnxError):
    """The export could not be written or failed verification."""


class RuntimeInputError(MoeOnnxError):
    """Inputs that the model cannot take (token ids, shapes, dtypes, context length)."""
