"""Built-in sandbox components, each module registered through the ``sandbox`` entry-point group."""
