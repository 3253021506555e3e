"""`confpy upstream list|add|del|drain|undrain`: the operators' member commands.

`command` parses and dispatches; `consul` and `etcd` speak to their registry; `common` holds what
both share (endpoints, `--meta`, what a command knows). Nothing in the runtime imports this package.
"""
