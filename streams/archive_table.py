"""Records to Arrow tables of one archive schema, split by hour: pure, no I/O.

Rows are buffered column by column, as plain Python lists of strings, numbers
and JSON bytes, and become Arrow arrays with one `pa.array` per column at flush
time; never row by row. Keeping columns rather than the decoded dicts is what
makes buffering 200,000 events cheap: strings, ints and bytes are not tracked
by Python's cyclic garbage collector, while millions of live dicts made every
collection walk all of them (profiled: decoding then cost 4x the raw loop).

A row that does not fit the schema (not an object, an unknown field, a value of
the wrong type) is left out and returned with the reason, for the dead-letter
topic; rows are checked one by one only when a column failed to convert.
"""
from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from schemas.archive import INDEX, OFFSET, PARTITION, RECORD_TIME, TIMESTAMP, ArchiveSchema
from streams.archive_layout import HOUR_MS

_CONVERSION = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError)

# A row left out: (offset, index in its envelope or None, reason, the row as JSON bytes).
BadRow = tuple[int, "int | None", str, bytes]


def _array(field: pa.Field, values: list) -> pa.Array:
    if field.type == TIMESTAMP:
        return pa.array(values, pa.int64()).view(TIMESTAMP)
    return pa.array(values, field.type)  # string columns take str, or orjson's UTF-8 bytes


class Columns:
    """The buffered rows of one partition of one topic, column by column, in offset order."""

    def __init__(self, spec: ArchiveSchema, partition: int) -> None:
        self.spec, self.partition = spec, partition
        self.fields = [spec.schema.field(n) for n in spec.fields]
        self._plan = [(f.name, f.name in spec.json_fields, []) for f in self.fields]
        self.offsets: list[int] = []
        self.indexes: list[int] = []
        self.record_times: list[int] = []
        self._known = frozenset(spec.fields)

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, rows: list, offset: int, record_ms: int) -> list[BadRow]:
        """Append the rows of one Kafka record (the events of an envelope, or the one
        object of a plain record); returns those that do not fit the schema."""
        known, bad = self._known, []
        positions = range(len(rows))
        if not all(type(r) is dict and known.issuperset(r) for r in rows):
            problems = {i: reason for i, r in enumerate(rows)
                        if (reason := _shape_problem(self.spec, r))}
            bad = [(offset, i if self.spec.envelope else None, reason, orjson.dumps(rows[i]))
                   for i, reason in problems.items()]
            positions = [i for i in positions if i not in problems]
            rows = [rows[i] for i in positions]
        n = len(rows)
        for name, is_json, column in self._plan:
            if is_json:
                column.extend([None if (v := r.get(name)) is None else orjson.dumps(v) for r in rows])
            else:
                column.extend([r.get(name) for r in rows])
        self.offsets.extend([offset] * n)
        if self.spec.envelope:
            self.indexes.extend(positions)
        self.record_times.extend([record_ms] * n)
        return bad

    def to_table(self) -> tuple[pa.Table, list[BadRow]]:
        """The rows as a table of the schema, and the rows whose values did not convert."""
        try:
            return self._table(None), []
        except _CONVERSION:
            pass
        bad: dict[int, str] = {}
        for field, (name, _, column) in zip(self.fields, self._plan):
            try:
                _array(field, column)
            except _CONVERSION:
                for i, value in enumerate(column):
                    if i not in bad:
                        try:
                            _array(field, [value])
                        except _CONVERSION as exc:
                            bad[i] = f"field {name!r}: {exc}"
        rows = [(self.offsets[i], self.indexes[i] if self.spec.envelope else None, reason,
                 orjson.dumps(self._row(i))) for i, reason in sorted(bad.items())]
        return self._table([i for i in range(len(self)) if i not in bad]), rows

    def _row(self, i: int) -> dict:
        return {name: (orjson.loads(column[i]) if is_json and column[i] is not None else column[i])
                for name, is_json, column in self._plan}

    def _table(self, keep: list[int] | None) -> pa.Table:
        def pick(values: list) -> list:
            return values if keep is None else [values[i] for i in keep]

        n = len(self) if keep is None else len(keep)
        arrays = []
        columns = {name: column for name, _, column in self._plan}
        for field in self.spec.schema:
            name = field.name
            if name == PARTITION:
                arrays.append(pa.repeat(pa.scalar(self.partition, pa.int32()), n))
            elif name == OFFSET:
                arrays.append(pa.array(pick(self.offsets), pa.int64()))
            elif name == INDEX:
                arrays.append(pa.array(pick(self.indexes), pa.int32()))
            elif name == RECORD_TIME:
                arrays.append(pa.array(pick(self.record_times), pa.int64()).view(TIMESTAMP))
            else:
                arrays.append(_array(field, pick(columns[name])))
        return pa.Table.from_arrays(arrays, schema=self.spec.schema)


def _shape_problem(spec: ArchiveSchema, row) -> str | None:
    if type(row) is not dict:
        return "not a JSON object"
    unknown = set(row) - set(spec.fields)
    if unknown:
        return f"field(s) not in the archive schema: {', '.join(sorted(unknown))}"
    return None


def check_time_field(spec: ArchiveSchema, field: str) -> None:
    """Raise ValueError unless `field` is an epoch-ms (timestamp) column of the schema."""
    if field not in spec.schema.names or spec.schema.field(field).type != TIMESTAMP:
        candidates = [f.name for f in spec.schema if f.type == TIMESTAMP]
        raise ValueError(f"{spec.topic}: {field!r} is not a time column; use one of "
                         f"{', '.join(candidates)}, event or record")


def hours(table: pa.Table, field: str) -> pa.Array:
    """Hour since the epoch of each row: its `field`, or its record time when that is null."""
    ms = pc.coalesce(table[field], table[RECORD_TIME]).cast(pa.int64())
    q = pc.divide(ms, HOUR_MS)  # truncates toward zero: floor it for times before 1970
    return pc.if_else(pc.less(ms, pc.multiply(q, HOUR_MS)), pc.subtract(q, 1), q)


def split_by_hour(table: pa.Table, field: str) -> list[tuple[int, pa.Table]]:
    """(hour, rows of that hour) in hour order; rows keep their order within an hour."""
    if table.num_rows == 0:
        return []
    hour = hours(table, field)
    distinct = sorted(pc.unique(hour).to_pylist())
    if len(distinct) == 1:
        return [(distinct[0], table)]
    return [(h, table.filter(pc.equal(hour, h))) for h in distinct]
