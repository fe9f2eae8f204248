"""Validate TOML files against a JSON Schema (draft-07), as an editor would.

Usage: check_schema.py SCHEMA.json FILE.toml...
Prints one JSON line per problem: {"file", "path", "message"}; exit 0 when every file is
valid, 1 when any is not, 2 when the schema itself is not a valid draft-07 schema.
"""
import json
import sys
import tomllib

import jsonschema


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        schema = json.load(f)
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        print(json.dumps({"file": sys.argv[1], "path": [], "message": f"invalid schema: {e.message}"}))
        return 2
    validator = jsonschema.Draft7Validator(schema)
    bad = False
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        for err in validator.iter_errors(doc):
            bad = True
            # oneOf errors hide the useful part: report the best match of each branch too.
            msgs = [err.message] + [c.message for c in err.context or []]
            print(json.dumps({"file": path, "path": list(err.absolute_path), "message": " | ".join(msgs)}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
