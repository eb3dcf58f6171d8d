"""HDF5 nodes exactly as PyTables writes them, written with h5py.

Readers (publicdb, SAPPHiRE) open the day files with PyTables, which recognises nodes by
their ``CLASS``/``VERSION``/``TITLE`` attributes, so every node gets the attributes
PyTables itself would write, with the same HDF5 types (fixed-length UTF-8 strings,
bitfield bools, int64 ``NROWS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5p, h5s, h5t

from hisparc_datastore.format.schema import BLOBS_NODE, BLOBS_TITLE, EventType
from hisparc_datastore.storage.dayfile.errors import DayFileError

#: About 64 KiB per chunk, like PyTables for the expected size of a day's table.
TABLE_CHUNK_BYTES = 64 * 1024
#: Blob chunks hold 16-byte heap references: 4096 of them is 64 KiB.
BLOB_CHUNK_ROWS = 4096
VLEN_UINT8 = h5py.vlen_dtype(np.dtype("uint8"))

def write_attr(obj: h5py.HLObject, name: str, value: str | np.generic) -> None:
    """Set one attribute with the HDF5 type PyTables uses for it.

    Strings: scalar fixed-length, NUL-terminated, UTF-8 (an empty string is a null
    dataspace, as PyTables writes the root's empty title).  Bools: an 8-bit bitfield,
    which PyTables maps to bool (h5py's bool enum would make PyTables give up on the
    node).  Numbers: their numpy type.
    """
    oid = obj.id
    bname = name.encode()
    if h5a.exists(oid, bname):
        h5a.delete(oid, bname)
    if isinstance(value, str):
        data = value.encode("utf-8")
        tid = h5t.C_S1.copy()
        tid.set_size(max(len(data), 1))
        tid.set_strpad(h5t.STR_NULLTERM)
        tid.set_cset(h5t.CSET_UTF8)
        if not data:
            h5a.create(oid, bname, tid, h5s.create(h5s.NULL))
            return
        attr = h5a.create(oid, bname, tid, h5s.create(h5s.SCALAR))
        attr.write(np.array(data, dtype=f"S{len(data)}"), mtype=tid)
        return
    array = np.asarray(value)
    if array.dtype == np.bool_:
        tid = h5t.STD_B8LE.copy()
        array = array.astype(np.uint8)
    else:
        tid = h5t.py_create(array.dtype)
    attr = h5a.create(oid, bname, tid, h5s.create(h5s.SCALAR))
    attr.write(np.ascontiguousarray(array), mtype=tid)


def set_nrows(dataset: h5py.Dataset, rows: int) -> None:
    bname = b"NROWS"
    value = np.array(rows, dtype=np.int64)
    if h5a.exists(dataset.id, bname):
        h5a.open(dataset.id, bname).write(value)
    else:
        write_attr(dataset, "NROWS", np.int64(rows))


def group_attrs(group: h5py.Group, title: str) -> None:
    write_attr(group, "CLASS", "GROUP")
    write_attr(group, "TITLE", title)
    write_attr(group, "VERSION", "1.0")


def _file_type(dtype: np.dtype) -> h5t.TypeCompoundID:
    """The on-disk compound type: numpy's packed layout, bools as PyTables' bitfields."""
    tid = h5t.create(h5t.COMPOUND, dtype.itemsize)
    for name in dtype.names or ():
        sub, offset = dtype.fields[name][:2]
        base = sub.base
        member = h5t.STD_B8LE.copy() if base == np.bool_ else h5t.py_create(base)
        if sub.shape:
            member = h5t.array_create(member, sub.shape)
        tid.insert(name.encode(), offset, member)
    return tid


def _with_bools_as_bytes(dtype: np.dtype) -> np.dtype:
    """The dtype h5py can convert to the bitfield members (for the dataset fill value)."""
    return np.dtype([
        (name, np.uint8 if dtype.fields[name][0].base == np.bool_ else dtype.fields[name][0].base,
         dtype.fields[name][0].shape)
        for name in dtype.names or ()
    ])


def create_table(
    parent: h5py.Group,
    name: str,
    dtype: np.dtype,
    title: str,
    fills: Sequence[Any] | None = None,
) -> h5py.Dataset:
    """An empty, extendible, chunked, uncompressed table that PyTables opens natively."""
    tid = _file_type(dtype)
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_chunk((max(1, TABLE_CHUNK_BYTES // dtype.itemsize),))
    fill_row = np.zeros((), dtype=dtype)
    if fills is not None:
        for column, fill in zip(dtype.names or (), fills, strict=True):
            fill_row[column] = fill
    dcpl.set_fill_value(np.asarray(fill_row.astype(_with_bools_as_bytes(dtype))))
    space = h5s.create_simple((0,), (h5s.UNLIMITED,))
    dataset = h5py.Dataset(h5d.create(parent.id, name.encode(), tid, space, dcpl=dcpl))
    write_attr(dataset, "CLASS", "TABLE")
    write_attr(dataset, "VERSION", "2.7")
    write_attr(dataset, "TITLE", title)
    write_attr(dataset, "NROWS", np.int64(0))
    for index, column in enumerate(dtype.names or ()):
        write_attr(dataset, f"FIELD_{index}_NAME", column)
        base = dtype.fields[column][0].base
        write_attr(dataset, f"FIELD_{index}_FILL", base.type(fill_row[column].flat[0]))
    return dataset


def create_event_table(parent: h5py.Group, event_type: EventType) -> h5py.Dataset:
    return create_table(
        parent,
        event_type.table,
        event_type.dtype,
        event_type.title,
        [column.fill for column in event_type.columns],
    )


def create_blobs(parent: h5py.Group) -> h5py.Dataset:
    """A PyTables VLArray of VLStringAtom: vlen uint8 rows, read back as ``bytes``."""
    dataset = parent.create_dataset(
        BLOBS_NODE, shape=(0,), maxshape=(None,), dtype=VLEN_UINT8, chunks=(BLOB_CHUNK_ROWS,)
    )
    write_attr(dataset, "CLASS", "VLARRAY")
    write_attr(dataset, "VERSION", "1.4")
    write_attr(dataset, "TITLE", BLOBS_TITLE)
    write_attr(dataset, "PSEUDOATOM", "vlstring")
    return dataset


def append_rows(dataset: h5py.Dataset, rows: np.ndarray) -> int:
    """One resize and one write; returns the first new row."""
    start = dataset.shape[0]
    if len(rows):
        dataset.resize((start + len(rows),))
        write_rows_at(dataset, start, rows)
    return start


def write_rows_at(dataset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Write rows in place, bytes unconverted.

    The memory type is the file's own compound type: our arrays have its exact layout
    (checked by :func:`_check_layout`), and numpy bools are the bytes of its bitfields.
    """
    count = len(rows)
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((start,), (count,))
    dataset.id.write(
        h5s.create_simple((count,)), file_space, np.ascontiguousarray(rows),
        mtype=dataset.id.get_type(),
    )


#: Blob bytes handed to one vlen write.  h5py copies every element of a vlen write into
#: buffers of its own, so one write of a whole batch's traces held them twice: written in
#: slices of this size, the peak RSS of a 1000-event batch dropped from 4.0x to 3.5x its
#: pickle (bench/memory.py).
BLOB_WRITE_BYTES = 1 << 20


def append_blobs(dataset: h5py.Dataset, blobs: Sequence[bytes]) -> int:
    start = dataset.shape[0]
    count = len(blobs)
    if not count:
        return start
    dataset.resize((start + count,))
    first = 0
    while first < count:
        end, size = first, 0
        while end < count and (end == first or size + len(blobs[end]) <= BLOB_WRITE_BYTES):
            size += len(blobs[end])
            end += 1
        # h5py's high-level write would turn equal-length blobs into a 2-d array.
        values = np.empty(end - first, dtype=object)
        for index in range(first, end):
            values[index - first] = np.frombuffer(blobs[index], dtype=np.uint8)
        file_space = dataset.id.get_space()
        file_space.select_hyperslab((start + first,), (end - first,))
        dataset.id.write(h5s.create_simple((end - first,)), file_space, values)
        first = end
    return start


def clear_vlen_references(dataset: h5py.Dataset, start: int, end: int) -> None:
    """Zero the on-disk heap references of elements ``start``.. of a blob array.

    HDF5 frees the heap objects of vlen elements it overwrites.  A writer killed
    mid-append can leave chunks holding references to heap collections that never
    reached the disk, beyond the extent we cut back to; the next append over those
    elements would then fail ("bad heap index").  Raw chunk I/O bypasses the vlen
    conversion, so the references become null ones (length 0) without HDF5 chasing them.
    """
    end = max(end, dataset.shape[0])
    if end <= start or dataset.chunks is None:
        return
    if dataset.shape[0] < end:
        dataset.resize((end,))  # chunks written beyond a stale extent become reachable
    chunk = dataset.chunks[0]
    for offset in range(start - start % chunk, end, chunk):
        info = dataset.id.get_chunk_info_by_coord((offset,))
        if info.byte_offset is None:
            continue
        mask, raw = dataset.id.read_direct_chunk((offset,))
        element = len(raw) // chunk
        first = max(start - offset, 0) * element
        cleared = bytes(raw[:first]) + bytes(len(raw) - first)
        dataset.id.write_direct_chunk((offset,), cleared, mask)


def check_layout(dataset: h5py.Dataset, dtype: np.dtype) -> None:
    """Refuse to write into a table whose on-disk columns are not ours byte for byte."""
    tid = dataset.id.get_type()
    names = dtype.names or ()
    problem = None
    if not isinstance(tid, h5t.TypeCompoundID) or tid.get_size() != dtype.itemsize:
        problem = "row size differs"
    elif tid.get_nmembers() != len(names):
        problem = "column count differs"
    else:
        for index, name in enumerate(names):
            sub, offset = dtype.fields[name][:2]
            if (
                tid.get_member_name(index).decode() != name
                or tid.get_member_offset(index) != offset
                or tid.get_member_type(index).get_size() != sub.itemsize
            ):
                problem = f"column {index} ({name}) differs"
                break
    if problem:
        raise DayFileError(f"{dataset.name} in {dataset.file.filename}: {problem} from the schema")


def table_complete(node: object, dtype: np.dtype) -> bool:
    """Whether a table got all its attributes (the last one written is the last fill)."""
    return isinstance(node, h5py.Dataset) and f"FIELD_{len(dtype.names or ()) - 1}_FILL" in (
        node.attrs
    )
