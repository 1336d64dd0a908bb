"""The tuner's own error type: bad models, settings or calibration data, with actionable messages."""


class TunerInputError(ValueError):
    """The model, settings or calibration data given to the tuner cannot be used."""
