"""The one error type users see: bad input, named by file, place and column.

The CLI turns an `InputError` into a single line on stderr and exit code 2, never a traceback.
"""


class InputError(Exception):
    """Bad input data or configuration.

    `location` is where in the file: "line 17" for text formats (the physical, 1-based line,
    header included), "row 17" for Parquet (1-based), or a config key such as "[data].paths".
    """

    def __init__(self, message: str, *, file=None, location: str | None = None, column: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.location = location
        self.column = column

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.location) if p]
        if self.column is not None:
            parts.append(f"column '{self.column}'")
        return ": ".join([", ".join(parts), self.message]) if parts else self.message


class ExportError(Exception):
    """A trained model that cannot be shipped (its ONNX graph does not reproduce it); names the file."""

    def __init__(self, message: str, *, file=None):
        super().__init__(message)
        self.file = str(file) if file is not None else None

    def __str__(self) -> str:
        return f"{self.file}: {self.args[0]}" if self.file else self.args[0]
