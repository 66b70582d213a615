"""The one exception type the library raises for bad input; the CLI turns it into one line on stderr."""


class FpsGraphError(Exception):
    """Bad input or an impossible request, with a message that names the file, tensor or option at fault."""
