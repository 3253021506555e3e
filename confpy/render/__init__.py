"""Rendering, one job a module: `naming` (nginx safety, upstream names), `datasource` (the data a
render reads), `functions` (the template functions beyond `service()`), `fragments` (incremental
rendering) and `renderer` (the Jinja2 environment and `RenderResult`), each importing only those
before it."""
