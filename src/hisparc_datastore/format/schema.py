"""The one declarative description of the 14 HiSPARC event types and their tables.

Everything the writer needs about a type (its table, title, columns, fills, blob codes and
where each upload code lands) is written down once, here.  The numpy row dtype and the
flat upload-code lookup are *derived* from that description, and the derivation checks
that every upload code names a column that exists, so the mapping can never drift from
the tables again (the reference's lightning mapping did: docs/FORMAT.md, section 5).

Column names, dtypes, shapes, fills and titles are the contract with PyTables readers
(publicdb, SAPPHiRE): docs/FORMAT.md, 4.6.  ``timestamp`` is ``<i4`` on disk (the reference's
Time32Col reads back as int32 through PyTables, and h5py cannot write Time32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np

Fill = int | float | bool


@dataclass(frozen=True)
class Column:
    """One table column: numpy dtype as PyTables reads it, per-row shape, fill value."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()
    fill: Fill = 0

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def typed_fill(self) -> np.generic:
        """The fill as a numpy scalar of the column's type (PyTables' FIELD_i_FILL)."""
        return self.np_dtype.type(self.fill)


@dataclass(frozen=True)
class Field:
    """Where one concrete upload code (``PH3``, ``EVENTRATE``) lands in a row."""

    column: str
    element: int | None  # index into an array column, None for a whole scalar column
    blob: bool  # the value goes to ``blobs``; the cell holds its index
    base64: bool  # blob value is base64 text (traces) to decode before storing


@dataclass(frozen=True)
class EventType:
    """An event type as declared: the source of truth for one table.

    ``codes`` maps upload codes to columns exactly as docs/FORMAT.md (4.6) lists them: indexed
    codes without their digit (``PH`` stands for ``PH1``..``PH4``).  ``blob_codes`` and
    ``base64_codes`` use the same digit-less names.
    """

    upload_code: str
    table: str
    title: str
    extended_time: bool
    columns: tuple[Column, ...]
    codes: Mapping[str, str]
    blob_codes: frozenset[str] = frozenset()
    base64_codes: frozenset[str] = frozenset()

    @cached_property
    def column_map(self) -> Mapping[str, Column]:
        return MappingProxyType({column.name: column for column in self.columns})

    @cached_property
    def dtype(self) -> np.dtype:
        """The numpy structured dtype of one table row, columns in declared order."""
        return np.dtype([(c.name, c.dtype, c.shape) for c in self.columns])

    @cached_property
    def fill_row(self) -> np.ndarray:
        """A 0-d structured array holding every column's fill: the start of each row."""
        row = np.zeros((), dtype=self.dtype)
        for column in self.columns:
            row[column.name] = column.fill
        return row

    @cached_property
    def fields(self) -> Mapping[str, Field]:
        """Concrete upload code -> where it lands, with indexed codes expanded.

        ``PH`` on a shape-(4,) column becomes ``PH1``..``PH4`` (elements 0..3), the rule of
        docs/FORMAT.md, 2.5 and 4.  Any other code, including ``PH5`` or a bare ``PH``, is
        not known.
        """
        return MappingProxyType(_expand_fields(self))


def _expand_fields(event_type: EventType) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for code, column_name in event_type.codes.items():
        column = event_type.column_map.get(column_name)
        if column is None:
            raise ValueError(
                f"{event_type.upload_code}: upload code {code} maps to column "
                f"{column_name!r}, which table {event_type.table!r} does not have"
            )
        blob = code in event_type.blob_codes
        b64 = code in event_type.base64_codes
        if column.shape:
            if len(column.shape) != 1 or not 1 <= column.shape[0] <= 9:
                raise ValueError(f"{column_name}: indexed columns are 1-d with 1..9 elements")
            for element in range(column.shape[0]):
                fields[f"{code}{element + 1}"] = Field(column_name, element, blob, b64)
        else:
            if code[-1:].isdigit():
                raise ValueError(f"{code}: a code for a scalar column cannot end in a digit")
            fields[code] = Field(column_name, None, blob, b64)
    return fields


def _validate(event_type: EventType) -> None:
    """Fail at import when the declaration is inconsistent, not when a station uploads."""
    names = [column.name for column in event_type.columns]
    if len(set(names)) != len(names):
        raise ValueError(f"{event_type.table}: duplicate column names")
    expected = list(_BASE_COLUMNS)
    if event_type.extended_time:
        expected += ["nanoseconds", "ext_timestamp"]
    if names[: len(expected)] != expected:
        raise ValueError(f"{event_type.table}: must start with columns {expected}")
    for code in event_type.blob_codes | event_type.base64_codes:
        if code not in event_type.codes:
            raise ValueError(f"{event_type.upload_code}: blob code {code} is not mapped")
    if not event_type.base64_codes <= event_type.blob_codes:
        raise ValueError(f"{event_type.upload_code}: base64 codes must be blob codes")
    fields = event_type.fields  # checks that every code lands in an existing column
    for field_ in fields.values():
        column = event_type.column_map[field_.column]
        kind = column.np_dtype.kind
        if field_.blob and column.np_dtype != np.dtype("<i4"):
            raise ValueError(f"{column.name}: blob index columns are <i4")
        # rows.py converts mapped values through float64; that is exact only up to 32 bits.
        if kind not in "biuf" or (kind in "iu" and column.np_dtype.itemsize > 4):
            raise ValueError(f"{column.name}: mapped columns must be bool or <=32-bit numbers")
    event_type.dtype  # noqa: B018 - builds, so a bad dtype string fails here


# -- column helpers: the format's tables read almost literally ------------------------------

def _b(name: str) -> Column:
    return Column(name, "bool", (), False)


def _u1(name: str) -> Column:
    return Column(name, "|u1", (), 0)


def _u2(name: str) -> Column:
    return Column(name, "<u2", (), 0)


def _u4(name: str) -> Column:
    return Column(name, "<u4", (), 0)


def _i2(name: str, fill: int = 0, shape: tuple[int, ...] = ()) -> Column:
    return Column(name, "<i2", shape, fill)


def _i4(name: str, fill: int = 0, shape: tuple[int, ...] = ()) -> Column:
    return Column(name, "<i4", shape, fill)


def _f4(name: str) -> Column:
    return Column(name, "<f4", (), 0.0)


def _f8(name: str) -> Column:
    return Column(name, "<f8", (), 0.0)


_BASE_COLUMNS = ("event_id", "timestamp")
_BASE = (_u4("event_id"), _i4("timestamp"))
_EXT = (_u4("nanoseconds"), Column("ext_timestamp", "<u8", (), 0))


def _master_slave(prefix: str) -> tuple[tuple[Column, ...], dict[str, str]]:
    """The 32 per-board config columns, identical for master and slave but for the prefix."""
    p, up = prefix, prefix.upper()
    columns = (
        *(_f8(f"{p}_{name}") for name in (
            "ch1_thres_low", "ch1_thres_high", "ch2_thres_low", "ch2_thres_high",
            "ch1_inttime", "ch2_inttime", "ch1_voltage", "ch2_voltage",
            "ch1_current", "ch2_current", "comp_thres_low", "comp_thres_high",
            "max_voltage",
        )),
        _b(f"{p}_reset"),
        *(_u1(f"{p}_{name}") for name in (
            "ch1_gain_pos", "ch1_gain_neg", "ch2_gain_pos", "ch2_gain_neg",
            "ch1_offset_pos", "ch1_offset_neg", "ch2_offset_pos", "ch2_offset_neg",
            "common_offset", "internal_voltage",
        )),
        *(_f8(f"{p}_{name}") for name in (
            "ch1_adc_gain", "ch1_adc_offset", "ch2_adc_gain", "ch2_adc_offset",
            "ch1_comp_gain", "ch1_comp_offset", "ch2_comp_gain", "ch2_comp_offset",
        )),
    )
    code_suffixes = (
        "CH1THRLOW", "CH1THRHIGH", "CH2THRLOW", "CH2THRHIGH", "CH1INTTIME", "CH2INTTIME",
        "CH1VOLT", "CH2VOLT", "CH1CURR", "CH2CURR", "COMPTHRLOW", "COMPTHRHIGH", "MAXVOLT",
        "RESET", "CH1GAINPOS", "CH1GAINNEG", "CH2GAINPOS", "CH2GAINNEG", "CH1OFFPOS",
        "CH1OFFNEG", "CH2OFFPOS", "CH2OFFNEG", "COMMOFF", "INTVOLTAGE", "CH1ADCGAIN",
        "CH1ADCOFF", "CH2ADCGAIN", "CH2ADCOFF", "CH1COMPGAIN", "CH1COMPOFF", "CH2COMPGAIN",
        "CH2COMPOFF",
    )
    codes = {
        f"CFG_{up}_{suffix}": column.name
        for suffix, column in zip(code_suffixes, columns, strict=True)
    }
    return columns, codes


def _config_type() -> EventType:
    mas_columns, mas_codes = _master_slave("mas")
    slv_columns, slv_codes = _master_slave("slv")
    return EventType(
        upload_code="CFG",
        table="config",
        title="HiSPARC configuration messages",
        extended_time=False,
        columns=(
            *_BASE,
            _f8("gps_latitude"), _f8("gps_longitude"), _f8("gps_altitude"),
            _i4("mas_version", -1), _i4("slv_version", -1),
            _u4("trig_low_signals"), _u4("trig_high_signals"), _u4("trig_external"),
            _b("trig_and_or"),
            _f8("precoinctime"), _f8("coinctime"), _f8("postcoinctime"),
            _u2("detnum"), _i4("password", -1), _u1("spare_bytes"),
            _b("use_filter"), _b("use_filter_threshold"), _b("reduce_data"),
            _i4("buffer", -1), _b("startmode"),
            _f8("delay_screen"), _f8("delay_check"), _f8("delay_error"),
            *mas_columns,
            *slv_columns,
        ),
        codes={
            "CFG_GPS_LAT": "gps_latitude",
            "CFG_GPS_LONG": "gps_longitude",
            "CFG_GPS_ALT": "gps_altitude",
            "CFG_MAS_VERSION": "mas_version",
            "CFG_SLV_VERSION": "slv_version",
            "CFG_TRIGLOWSIG": "trig_low_signals",
            "CFG_TRIGHIGHSIG": "trig_high_signals",
            "CFG_TRIGEXT": "trig_external",
            "CFG_TRIGANDOR": "trig_and_or",
            "CFG_PRECTIME": "precoinctime",
            "CFG_CTIME": "coinctime",
            "CFG_POSTCTIME": "postcoinctime",
            "CFG_DETNUM": "detnum",
            "CFG_PASSWORD": "password",
            "CFG_SPAREBYTES": "spare_bytes",
            "CFG_USEFILTER": "use_filter",
            "CFG_USEFILTTHRES": "use_filter_threshold",
            "CFG_REDUCE": "reduce_data",
            "CFG_BUFFER": "buffer",
            "CFG_STARTMODE": "startmode",
            "CFG_DELAYSCREEN": "delay_screen",
            "CFG_DELAYCHECK": "delay_check",
            "CFG_DELAYERROR": "delay_error",
            **mas_codes,
            **slv_codes,
        },
        blob_codes=frozenset({"CFG_MAS_VERSION", "CFG_SLV_VERSION", "CFG_PASSWORD", "CFG_BUFFER"}),
    )


def _device_config_type(
    upload_code: str, table: str, title: str, extra: tuple[Column, ...],
    extra_codes: dict[str, str],
) -> EventType:
    """Weather and lightning config messages share their first eleven columns."""
    p = upload_code
    return EventType(
        upload_code=upload_code,
        table=table,
        title=title,
        extended_time=False,
        columns=(
            *_BASE,
            _u1("com_port"), _i2("baud_rate"), _u4("station_id"),
            _i4("database_name", -1), _i4("help_url", -1), _b("daq_mode"),
            _f8("latitude"), _f8("longitude"), _f8("altitude"),
            *extra,
        ),
        codes={
            f"{p}_COM_PORT": "com_port",
            f"{p}_BAUD_RATE": "baud_rate",
            f"{p}_STATION_ID": "station_id",
            f"{p}_DATABASE_NAME": "database_name",
            f"{p}_HELP_URL": "help_url",
            f"{p}_DAQ_MODE": "daq_mode",
            f"{p}_LATITUDE": "latitude",
            f"{p}_LONGITUDE": "longitude",
            f"{p}_ALTITUDE": "altitude",
            **extra_codes,
        },
        blob_codes=frozenset({f"{p}_HELP_URL", f"{p}_DATABASE_NAME"}),
    )


def _messages_type(upload_code: str, table: str, title: str, code: str) -> EventType:
    """Error message types: one blob column ``messages``."""
    return EventType(
        upload_code=upload_code,
        table=table,
        title=title,
        extended_time=False,
        columns=(*_BASE, _i4("messages", -1)),
        codes={code: "messages"},
        blob_codes=frozenset({code}),
    )


_WEATHER_FLAGS = (
    "temperature_inside", "temperature_outside", "humidity_inside", "humidity_outside",
    "barometer", "wind_direction", "wind_speed", "solar_radiation", "uv_index",
    "evapotranspiration", "rain_rate", "heat_index", "dew_point", "wind_chill",
)

_TYPES: tuple[EventType, ...] = (
    EventType(
        upload_code="CIC",
        table="events",
        title="HiSPARC event data",
        extended_time=True,
        columns=(
            *_BASE, *_EXT,
            _b("data_reduction"),
            _u4("trigger_pattern"),
            _i2("baseline", -1, (4,)),
            _i2("std_dev", -1, (4,)),
            _i2("n_peaks", -1, (4,)),
            _i2("pulseheights", -1, (4,)),
            _i4("integrals", -1, (4,)),
            _i4("traces", -1, (4,)),
            _f4("event_rate"),
        ),
        codes={
            "RED": "data_reduction",
            "EVENTRATE": "event_rate",
            "TRIGPATTERN": "trigger_pattern",
            "BL": "baseline",
            "STDDEV": "std_dev",
            "NP": "n_peaks",
            "PH": "pulseheights",
            "IN": "integrals",
            "TR": "traces",
        },
        blob_codes=frozenset({"TR"}),
        base64_codes=frozenset({"TR"}),
    ),
    _messages_type("ERR", "errors", "HiSPARC error messages", "ERRMSG"),
    _config_type(),
    EventType(
        upload_code="CMP",
        table="comparator",
        title="HiSPARC comparator messages",
        extended_time=True,
        columns=(*_BASE, *_EXT, _u1("device"), _u1("comparator"), _u2("count")),
        codes={"CMP_DEVICE": "device", "CMP_COMPARATOR": "comparator", "CMP_COUNT": "count"},
    ),
    EventType(
        upload_code="SIN",
        table="singles",
        title="HiSPARC single messages",
        extended_time=False,
        columns=(
            *_BASE,
            *(_i4(f"{board}_{ch}_{level}", -1)
              for board in ("mas", "slv") for ch in ("ch1", "ch2") for level in ("low", "high")),
        ),
        codes={
            f"{board}_{ch}_{level}".upper(): f"{board}_{ch}_{level}"
            for board in ("mas", "slv") for ch in ("ch1", "ch2") for level in ("low", "high")
        },
    ),
    EventType(
        upload_code="SAT",
        table="satellites",
        title="HiSPARC satellite messages",
        extended_time=False,
        columns=(
            *_BASE,
            _u2("min_n"), _f4("mean_n"), _u2("max_n"),
            _u2("min_signal"), _f4("mean_signal"), _u2("max_signal"),
        ),
        codes={
            "MIN_N": "min_n", "MEAN_N": "mean_n", "MAX_N": "max_n",
            "MIN_SIGNAL": "min_signal", "MEAN_SIGNAL": "mean_signal", "MAX_SIGNAL": "max_signal",
        },
    ),
    EventType(
        upload_code="WTR",
        table="weather",
        title="HiSPARC weather data",
        extended_time=False,
        columns=(
            *_BASE,
            _f4("temp_inside"), _f4("temp_outside"),
            _i2("humidity_inside"), _i2("humidity_outside"),
            _f4("barometer"),
            _i2("wind_dir"), _i2("wind_speed"), _i2("solar_rad"), _i2("uv"),
            _f4("evapotranspiration"), _f4("rain_rate"),
            _i2("heat_index"),
            _f4("dew_point"), _f4("wind_chill"),
        ),
        codes={
            "WTR_TEMP_INSIDE": "temp_inside",
            "WTR_TEMP_OUTSIDE": "temp_outside",
            "WTR_HUMIDITY_INSIDE": "humidity_inside",
            "WTR_HUMIDITY_OUTSIDE": "humidity_outside",
            "WTR_BAROMETER": "barometer",
            "WTR_WIND_DIR": "wind_dir",
            "WTR_WIND_SPEED": "wind_speed",
            "WTR_SOLAR_RAD": "solar_rad",
            "WTR_UV": "uv",
            "WTR_ET": "evapotranspiration",
            "WTR_RAIN_RATE": "rain_rate",
            "WTR_HEAT_INDEX": "heat_index",
            "WTR_DEW_POINT": "dew_point",
            "WTR_WIND_CHILL": "wind_chill",
        },
    ),
    _messages_type("WER", "weather_errors", "HiSPARC weather error messages", "WER_ERRMSG"),
    _device_config_type(
        "WCG",
        "weather_config",
        "HiSPARC weather configuration messages",
        (
            *(_b(flag) for flag in _WEATHER_FLAGS),
            _f4("offset_inside_temperature"), _f4("offset_outside_temperature"),
            _i2("offset_inside_humidity"), _i2("offset_outside_humidity"),
            _i2("offset_wind_direction"),
            _f4("offset_station_altitude"), _f4("offset_bar_sea_level"),
        ),
        {
            **{f"WCG_{flag.upper()}": flag for flag in _WEATHER_FLAGS},
            "WCG_OFFSET_INSIDE_TEMPERATURE": "offset_inside_temperature",
            "WCG_OFFSET_OUTSIDE_TEMPERATURE": "offset_outside_temperature",
            "WCG_OFFSET_INSIDE_HUMIDITY": "offset_inside_humidity",
            "WCG_OFFSET_OUTSIDE_HUMIDITY": "offset_outside_humidity",
            "WCG_OFFSET_WIND_DIRECTION": "offset_wind_direction",
            "WCG_OFFSET_STATION_ALTITUDE": "offset_station_altitude",
            "WCG_OFFSET_BAR_SEA_LEVEL": "offset_bar_sea_level",
        },
    ),
    EventType(
        upload_code="LIT",
        table="lightning",
        title="HiSPARC lightning data",
        extended_time=False,
        columns=(
            *_BASE,
            _i2("corr_distance"), _i2("uncorr_distance"),
            _f4("uncorr_angle"), _f4("corr_angle"),
        ),
        codes={
            "LIT_CORR_DIST": "corr_distance",
            "LIT_UNCORR_DIST": "uncorr_distance",
            # The reference mapped these to 'uncorr_anlge'/'corr_anlge' (docs/FORMAT.md, section 5).
            "LIT_UNCORR_ANGLE": "uncorr_angle",
            "LIT_CORR_ANGLE": "corr_angle",
        },
    ),
    _messages_type("LER", "lightning_errors", "HiSPARC lightning error messages", "LER_ERRMSG"),
    _device_config_type(
        "LCG",
        "lightning_config",
        "HiSPARC lightning configuration messages",
        (
            _i4("squelch_seting"), _i4("close_alarm_distance"), _i4("severe_alarm_distance"),
            _b("noise_beep"), _i4("minimum_gps_speed"), _f4("angle_correction"),
        ),
        {
            # The column keeps the name readers know; the reference mapped 'squelch_setting'.
            "LCG_SQUELCH_SETTING": "squelch_seting",
            "LCG_CLOSE_ALARM_DISTANCE": "close_alarm_distance",
            "LCG_SEVERE_ALARM_DISTANCE": "severe_alarm_distance",
            "LCG_NOISE_BEEP": "noise_beep",
            "LCG_MINIMUM_GPS_SPEED": "minimum_gps_speed",
            "LCG_ANGLE_CORRECTION": "angle_correction",
        },
    ),
    EventType(
        upload_code="LST",
        table="lightning_status",
        title="HiSPARC lightning status messages",
        extended_time=False,
        columns=(
            *_BASE,
            _i2("close_rate"), _i2("total_rate"),
            _b("close_alarm"), _b("sever_alarm"),
            _f4("current_heading"),
        ),
        codes={
            "LST_CLOSE_RATE": "close_rate",
            "LST_TOTAL_RATE": "total_rate",
            "LST_CLOSE_ALARM": "close_alarm",
            # The column keeps the name readers know; the reference mapped 'severe_alarm'.
            "LST_SEVERE_ALARM": "sever_alarm",
            "LST_CURR_HEADING": "current_heading",
        },
    ),
    EventType(
        upload_code="LNS",
        table="lightning_noise",
        title="HiSPARC lightning noise messages",
        extended_time=False,
        columns=_BASE,
        codes={},
    ),
)

for _event_type in _TYPES:
    _validate(_event_type)

#: Upload code (``CIC``) -> event type.
EVENT_TYPES: Mapping[str, EventType] = MappingProxyType({t.upload_code: t for t in _TYPES})
#: Table name (``events``) -> event type; a table belongs to exactly one type.
TABLES: Mapping[str, EventType] = MappingProxyType({t.table: t for t in _TYPES})
#: Table names in declaration order (the order the ledger and tests use).
TABLE_NAMES: tuple[str, ...] = tuple(t.table for t in _TYPES)

if len(TABLES) != len(_TYPES) or len(EVENT_TYPES) != len(_TYPES):
    raise ValueError("event types and tables must be one-to-one")

#: Node and title of the per-station blob array.
BLOBS_NODE = "blobs"
BLOBS_TITLE = "HiSPARC binary data"
ROOT_GROUP = "hisparc"
ROOT_TITLE = "HiSPARC data"


def cluster_node(cluster: str) -> str:
    return f"cluster_{cluster.lower()}"


def cluster_title(cluster: str) -> str:
    return f"HiSPARC cluster {cluster} data"


def station_node(station: int) -> str:
    return f"station_{station}"


def station_title(station: int) -> str:
    return f"HiSPARC station {station} data"


__all__ = [
    "BLOBS_NODE",
    "BLOBS_TITLE",
    "EVENT_TYPES",
    "ROOT_GROUP",
    "ROOT_TITLE",
    "TABLES",
    "TABLE_NAMES",
    "Column",
    "EventType",
    "Field",
    "cluster_node",
    "cluster_title",
    "station_node",
    "station_title",
]
