"""The declarative schema against the contract (docs/FORMAT.md, section 4.6), written out here.

The expectations are literal (not parsed from the docs at test time), one line per column
and per upload code, so a change to the schema that readers would notice fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from hisparc_datastore.format import schema
from hisparc_datastore.format.schema import EVENT_TYPES, TABLE_NAMES, TABLES, Column, EventType

# table -> (title, [(column, numpy dtype as PyTables reads it, shape, fill)])
TABLE_EXPECTATIONS = {
    'events': (
        'HiSPARC event data',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('nanoseconds', '<u4', (), 0),
            ('ext_timestamp', '<u8', (), 0),
            ('data_reduction', 'bool', (), False),
            ('trigger_pattern', '<u4', (), 0),
            ('baseline', '<i2', (4,), -1),
            ('std_dev', '<i2', (4,), -1),
            ('n_peaks', '<i2', (4,), -1),
            ('pulseheights', '<i2', (4,), -1),
            ('integrals', '<i4', (4,), -1),
            ('traces', '<i4', (4,), -1),
            ('event_rate', '<f4', (), 0.0),
        ],
    ),
    'errors': (
        'HiSPARC error messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('messages', '<i4', (), -1),
        ],
    ),
    'config': (
        'HiSPARC configuration messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('gps_latitude', '<f8', (), 0.0),
            ('gps_longitude', '<f8', (), 0.0),
            ('gps_altitude', '<f8', (), 0.0),
            ('mas_version', '<i4', (), -1),
            ('slv_version', '<i4', (), -1),
            ('trig_low_signals', '<u4', (), 0),
            ('trig_high_signals', '<u4', (), 0),
            ('trig_external', '<u4', (), 0),
            ('trig_and_or', 'bool', (), False),
            ('precoinctime', '<f8', (), 0.0),
            ('coinctime', '<f8', (), 0.0),
            ('postcoinctime', '<f8', (), 0.0),
            ('detnum', '<u2', (), 0),
            ('password', '<i4', (), -1),
            ('spare_bytes', '|u1', (), 0),
            ('use_filter', 'bool', (), False),
            ('use_filter_threshold', 'bool', (), False),
            ('reduce_data', 'bool', (), False),
            ('buffer', '<i4', (), -1),
            ('startmode', 'bool', (), False),
            ('delay_screen', '<f8', (), 0.0),
            ('delay_check', '<f8', (), 0.0),
            ('delay_error', '<f8', (), 0.0),
            ('mas_ch1_thres_low', '<f8', (), 0.0),
            ('mas_ch1_thres_high', '<f8', (), 0.0),
            ('mas_ch2_thres_low', '<f8', (), 0.0),
            ('mas_ch2_thres_high', '<f8', (), 0.0),
            ('mas_ch1_inttime', '<f8', (), 0.0),
            ('mas_ch2_inttime', '<f8', (), 0.0),
            ('mas_ch1_voltage', '<f8', (), 0.0),
            ('mas_ch2_voltage', '<f8', (), 0.0),
            ('mas_ch1_current', '<f8', (), 0.0),
            ('mas_ch2_current', '<f8', (), 0.0),
            ('mas_comp_thres_low', '<f8', (), 0.0),
            ('mas_comp_thres_high', '<f8', (), 0.0),
            ('mas_max_voltage', '<f8', (), 0.0),
            ('mas_reset', 'bool', (), False),
            ('mas_ch1_gain_pos', '|u1', (), 0),
            ('mas_ch1_gain_neg', '|u1', (), 0),
            ('mas_ch2_gain_pos', '|u1', (), 0),
            ('mas_ch2_gain_neg', '|u1', (), 0),
            ('mas_ch1_offset_pos', '|u1', (), 0),
            ('mas_ch1_offset_neg', '|u1', (), 0),
            ('mas_ch2_offset_pos', '|u1', (), 0),
            ('mas_ch2_offset_neg', '|u1', (), 0),
            ('mas_common_offset', '|u1', (), 0),
            ('mas_internal_voltage', '|u1', (), 0),
            ('mas_ch1_adc_gain', '<f8', (), 0.0),
            ('mas_ch1_adc_offset', '<f8', (), 0.0),
            ('mas_ch2_adc_gain', '<f8', (), 0.0),
            ('mas_ch2_adc_offset', '<f8', (), 0.0),
            ('mas_ch1_comp_gain', '<f8', (), 0.0),
            ('mas_ch1_comp_offset', '<f8', (), 0.0),
            ('mas_ch2_comp_gain', '<f8', (), 0.0),
            ('mas_ch2_comp_offset', '<f8', (), 0.0),
            ('slv_ch1_thres_low', '<f8', (), 0.0),
            ('slv_ch1_thres_high', '<f8', (), 0.0),
            ('slv_ch2_thres_low', '<f8', (), 0.0),
            ('slv_ch2_thres_high', '<f8', (), 0.0),
            ('slv_ch1_inttime', '<f8', (), 0.0),
            ('slv_ch2_inttime', '<f8', (), 0.0),
            ('slv_ch1_voltage', '<f8', (), 0.0),
            ('slv_ch2_voltage', '<f8', (), 0.0),
            ('slv_ch1_current', '<f8', (), 0.0),
            ('slv_ch2_current', '<f8', (), 0.0),
            ('slv_comp_thres_low', '<f8', (), 0.0),
            ('slv_comp_thres_high', '<f8', (), 0.0),
            ('slv_max_voltage', '<f8', (), 0.0),
            ('slv_reset', 'bool', (), False),
            ('slv_ch1_gain_pos', '|u1', (), 0),
            ('slv_ch1_gain_neg', '|u1', (), 0),
            ('slv_ch2_gain_pos', '|u1', (), 0),
            ('slv_ch2_gain_neg', '|u1', (), 0),
            ('slv_ch1_offset_pos', '|u1', (), 0),
            ('slv_ch1_offset_neg', '|u1', (), 0),
            ('slv_ch2_offset_pos', '|u1', (), 0),
            ('slv_ch2_offset_neg', '|u1', (), 0),
            ('slv_common_offset', '|u1', (), 0),
            ('slv_internal_voltage', '|u1', (), 0),
            ('slv_ch1_adc_gain', '<f8', (), 0.0),
            ('slv_ch1_adc_offset', '<f8', (), 0.0),
            ('slv_ch2_adc_gain', '<f8', (), 0.0),
            ('slv_ch2_adc_offset', '<f8', (), 0.0),
            ('slv_ch1_comp_gain', '<f8', (), 0.0),
            ('slv_ch1_comp_offset', '<f8', (), 0.0),
            ('slv_ch2_comp_gain', '<f8', (), 0.0),
            ('slv_ch2_comp_offset', '<f8', (), 0.0),
        ],
    ),
    'comparator': (
        'HiSPARC comparator messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('nanoseconds', '<u4', (), 0),
            ('ext_timestamp', '<u8', (), 0),
            ('device', '|u1', (), 0),
            ('comparator', '|u1', (), 0),
            ('count', '<u2', (), 0),
        ],
    ),
    'singles': (
        'HiSPARC single messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('mas_ch1_low', '<i4', (), -1),
            ('mas_ch1_high', '<i4', (), -1),
            ('mas_ch2_low', '<i4', (), -1),
            ('mas_ch2_high', '<i4', (), -1),
            ('slv_ch1_low', '<i4', (), -1),
            ('slv_ch1_high', '<i4', (), -1),
            ('slv_ch2_low', '<i4', (), -1),
            ('slv_ch2_high', '<i4', (), -1),
        ],
    ),
    'satellites': (
        'HiSPARC satellite messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('min_n', '<u2', (), 0),
            ('mean_n', '<f4', (), 0.0),
            ('max_n', '<u2', (), 0),
            ('min_signal', '<u2', (), 0),
            ('mean_signal', '<f4', (), 0.0),
            ('max_signal', '<u2', (), 0),
        ],
    ),
    'weather': (
        'HiSPARC weather data',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('temp_inside', '<f4', (), 0.0),
            ('temp_outside', '<f4', (), 0.0),
            ('humidity_inside', '<i2', (), 0),
            ('humidity_outside', '<i2', (), 0),
            ('barometer', '<f4', (), 0.0),
            ('wind_dir', '<i2', (), 0),
            ('wind_speed', '<i2', (), 0),
            ('solar_rad', '<i2', (), 0),
            ('uv', '<i2', (), 0),
            ('evapotranspiration', '<f4', (), 0.0),
            ('rain_rate', '<f4', (), 0.0),
            ('heat_index', '<i2', (), 0),
            ('dew_point', '<f4', (), 0.0),
            ('wind_chill', '<f4', (), 0.0),
        ],
    ),
    'weather_errors': (
        'HiSPARC weather error messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('messages', '<i4', (), -1),
        ],
    ),
    'weather_config': (
        'HiSPARC weather configuration messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('com_port', '|u1', (), 0),
            ('baud_rate', '<i2', (), 0),
            ('station_id', '<u4', (), 0),
            ('database_name', '<i4', (), -1),
            ('help_url', '<i4', (), -1),
            ('daq_mode', 'bool', (), False),
            ('latitude', '<f8', (), 0.0),
            ('longitude', '<f8', (), 0.0),
            ('altitude', '<f8', (), 0.0),
            ('temperature_inside', 'bool', (), False),
            ('temperature_outside', 'bool', (), False),
            ('humidity_inside', 'bool', (), False),
            ('humidity_outside', 'bool', (), False),
            ('barometer', 'bool', (), False),
            ('wind_direction', 'bool', (), False),
            ('wind_speed', 'bool', (), False),
            ('solar_radiation', 'bool', (), False),
            ('uv_index', 'bool', (), False),
            ('evapotranspiration', 'bool', (), False),
            ('rain_rate', 'bool', (), False),
            ('heat_index', 'bool', (), False),
            ('dew_point', 'bool', (), False),
            ('wind_chill', 'bool', (), False),
            ('offset_inside_temperature', '<f4', (), 0.0),
            ('offset_outside_temperature', '<f4', (), 0.0),
            ('offset_inside_humidity', '<i2', (), 0),
            ('offset_outside_humidity', '<i2', (), 0),
            ('offset_wind_direction', '<i2', (), 0),
            ('offset_station_altitude', '<f4', (), 0.0),
            ('offset_bar_sea_level', '<f4', (), 0.0),
        ],
    ),
    'lightning': (
        'HiSPARC lightning data',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('corr_distance', '<i2', (), 0),
            ('uncorr_distance', '<i2', (), 0),
            ('uncorr_angle', '<f4', (), 0.0),
            ('corr_angle', '<f4', (), 0.0),
        ],
    ),
    'lightning_errors': (
        'HiSPARC lightning error messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('messages', '<i4', (), -1),
        ],
    ),
    'lightning_config': (
        'HiSPARC lightning configuration messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('com_port', '|u1', (), 0),
            ('baud_rate', '<i2', (), 0),
            ('station_id', '<u4', (), 0),
            ('database_name', '<i4', (), -1),
            ('help_url', '<i4', (), -1),
            ('daq_mode', 'bool', (), False),
            ('latitude', '<f8', (), 0.0),
            ('longitude', '<f8', (), 0.0),
            ('altitude', '<f8', (), 0.0),
            ('squelch_seting', '<i4', (), 0),
            ('close_alarm_distance', '<i4', (), 0),
            ('severe_alarm_distance', '<i4', (), 0),
            ('noise_beep', 'bool', (), False),
            ('minimum_gps_speed', '<i4', (), 0),
            ('angle_correction', '<f4', (), 0.0),
        ],
    ),
    'lightning_status': (
        'HiSPARC lightning status messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
            ('close_rate', '<i2', (), 0),
            ('total_rate', '<i2', (), 0),
            ('close_alarm', 'bool', (), False),
            ('sever_alarm', 'bool', (), False),
            ('current_heading', '<f4', (), 0.0),
        ],
    ),
    'lightning_noise': (
        'HiSPARC lightning noise messages',
        [
            ('event_id', '<u4', (), 0),
            ('timestamp', '<i4', (), 0),
        ],
    ),
}

# upload code -> (table, extended time, blob codes, {upload code: column})
TYPE_EXPECTATIONS = {
    'CIC': ('events', True, {'TR'}, {
        'RED': 'data_reduction',
        'EVENTRATE': 'event_rate',
        'TRIGPATTERN': 'trigger_pattern',
        'BL': 'baseline',
        'STDDEV': 'std_dev',
        'NP': 'n_peaks',
        'PH': 'pulseheights',
        'IN': 'integrals',
        'TR': 'traces',
    }),
    'ERR': ('errors', False, {'ERRMSG'}, {
        'ERRMSG': 'messages',
    }),
    'CFG': ('config', False, {'CFG_MAS_VERSION', 'CFG_SLV_VERSION', 'CFG_PASSWORD', 'CFG_BUFFER'}, {
        'CFG_GPS_LAT': 'gps_latitude',
        'CFG_GPS_LONG': 'gps_longitude',
        'CFG_GPS_ALT': 'gps_altitude',
        'CFG_MAS_VERSION': 'mas_version',
        'CFG_SLV_VERSION': 'slv_version',
        'CFG_TRIGLOWSIG': 'trig_low_signals',
        'CFG_TRIGHIGHSIG': 'trig_high_signals',
        'CFG_TRIGEXT': 'trig_external',
        'CFG_TRIGANDOR': 'trig_and_or',
        'CFG_PRECTIME': 'precoinctime',
        'CFG_CTIME': 'coinctime',
        'CFG_POSTCTIME': 'postcoinctime',
        'CFG_DETNUM': 'detnum',
        'CFG_PASSWORD': 'password',
        'CFG_SPAREBYTES': 'spare_bytes',
        'CFG_USEFILTER': 'use_filter',
        'CFG_USEFILTTHRES': 'use_filter_threshold',
        'CFG_REDUCE': 'reduce_data',
        'CFG_BUFFER': 'buffer',
        'CFG_STARTMODE': 'startmode',
        'CFG_DELAYSCREEN': 'delay_screen',
        'CFG_DELAYCHECK': 'delay_check',
        'CFG_DELAYERROR': 'delay_error',
        'CFG_MAS_CH1THRLOW': 'mas_ch1_thres_low',
        'CFG_MAS_CH1THRHIGH': 'mas_ch1_thres_high',
        'CFG_MAS_CH2THRLOW': 'mas_ch2_thres_low',
        'CFG_MAS_CH2THRHIGH': 'mas_ch2_thres_high',
        'CFG_MAS_CH1INTTIME': 'mas_ch1_inttime',
        'CFG_MAS_CH2INTTIME': 'mas_ch2_inttime',
        'CFG_MAS_CH1VOLT': 'mas_ch1_voltage',
        'CFG_MAS_CH2VOLT': 'mas_ch2_voltage',
        'CFG_MAS_CH1CURR': 'mas_ch1_current',
        'CFG_MAS_CH2CURR': 'mas_ch2_current',
        'CFG_MAS_COMPTHRLOW': 'mas_comp_thres_low',
        'CFG_MAS_COMPTHRHIGH': 'mas_comp_thres_high',
        'CFG_MAS_MAXVOLT': 'mas_max_voltage',
        'CFG_MAS_RESET': 'mas_reset',
        'CFG_MAS_CH1GAINPOS': 'mas_ch1_gain_pos',
        'CFG_MAS_CH1GAINNEG': 'mas_ch1_gain_neg',
        'CFG_MAS_CH2GAINPOS': 'mas_ch2_gain_pos',
        'CFG_MAS_CH2GAINNEG': 'mas_ch2_gain_neg',
        'CFG_MAS_CH1OFFPOS': 'mas_ch1_offset_pos',
        'CFG_MAS_CH1OFFNEG': 'mas_ch1_offset_neg',
        'CFG_MAS_CH2OFFPOS': 'mas_ch2_offset_pos',
        'CFG_MAS_CH2OFFNEG': 'mas_ch2_offset_neg',
        'CFG_MAS_COMMOFF': 'mas_common_offset',
        'CFG_MAS_INTVOLTAGE': 'mas_internal_voltage',
        'CFG_MAS_CH1ADCGAIN': 'mas_ch1_adc_gain',
        'CFG_MAS_CH1ADCOFF': 'mas_ch1_adc_offset',
        'CFG_MAS_CH2ADCGAIN': 'mas_ch2_adc_gain',
        'CFG_MAS_CH2ADCOFF': 'mas_ch2_adc_offset',
        'CFG_MAS_CH1COMPGAIN': 'mas_ch1_comp_gain',
        'CFG_MAS_CH1COMPOFF': 'mas_ch1_comp_offset',
        'CFG_MAS_CH2COMPGAIN': 'mas_ch2_comp_gain',
        'CFG_MAS_CH2COMPOFF': 'mas_ch2_comp_offset',
        'CFG_SLV_CH1THRLOW': 'slv_ch1_thres_low',
        'CFG_SLV_CH1THRHIGH': 'slv_ch1_thres_high',
        'CFG_SLV_CH2THRLOW': 'slv_ch2_thres_low',
        'CFG_SLV_CH2THRHIGH': 'slv_ch2_thres_high',
        'CFG_SLV_CH1INTTIME': 'slv_ch1_inttime',
        'CFG_SLV_CH2INTTIME': 'slv_ch2_inttime',
        'CFG_SLV_CH1VOLT': 'slv_ch1_voltage',
        'CFG_SLV_CH2VOLT': 'slv_ch2_voltage',
        'CFG_SLV_CH1CURR': 'slv_ch1_current',
        'CFG_SLV_CH2CURR': 'slv_ch2_current',
        'CFG_SLV_COMPTHRLOW': 'slv_comp_thres_low',
        'CFG_SLV_COMPTHRHIGH': 'slv_comp_thres_high',
        'CFG_SLV_MAXVOLT': 'slv_max_voltage',
        'CFG_SLV_RESET': 'slv_reset',
        'CFG_SLV_CH1GAINPOS': 'slv_ch1_gain_pos',
        'CFG_SLV_CH1GAINNEG': 'slv_ch1_gain_neg',
        'CFG_SLV_CH2GAINPOS': 'slv_ch2_gain_pos',
        'CFG_SLV_CH2GAINNEG': 'slv_ch2_gain_neg',
        'CFG_SLV_CH1OFFPOS': 'slv_ch1_offset_pos',
        'CFG_SLV_CH1OFFNEG': 'slv_ch1_offset_neg',
        'CFG_SLV_CH2OFFPOS': 'slv_ch2_offset_pos',
        'CFG_SLV_CH2OFFNEG': 'slv_ch2_offset_neg',
        'CFG_SLV_COMMOFF': 'slv_common_offset',
        'CFG_SLV_INTVOLTAGE': 'slv_internal_voltage',
        'CFG_SLV_CH1ADCGAIN': 'slv_ch1_adc_gain',
        'CFG_SLV_CH1ADCOFF': 'slv_ch1_adc_offset',
        'CFG_SLV_CH2ADCGAIN': 'slv_ch2_adc_gain',
        'CFG_SLV_CH2ADCOFF': 'slv_ch2_adc_offset',
        'CFG_SLV_CH1COMPGAIN': 'slv_ch1_comp_gain',
        'CFG_SLV_CH1COMPOFF': 'slv_ch1_comp_offset',
        'CFG_SLV_CH2COMPGAIN': 'slv_ch2_comp_gain',
        'CFG_SLV_CH2COMPOFF': 'slv_ch2_comp_offset',
    }),
    'CMP': ('comparator', True, set(), {
        'CMP_DEVICE': 'device',
        'CMP_COMPARATOR': 'comparator',
        'CMP_COUNT': 'count',
    }),
    'SIN': ('singles', False, set(), {
        'MAS_CH1_LOW': 'mas_ch1_low',
        'MAS_CH1_HIGH': 'mas_ch1_high',
        'MAS_CH2_LOW': 'mas_ch2_low',
        'MAS_CH2_HIGH': 'mas_ch2_high',
        'SLV_CH1_LOW': 'slv_ch1_low',
        'SLV_CH1_HIGH': 'slv_ch1_high',
        'SLV_CH2_LOW': 'slv_ch2_low',
        'SLV_CH2_HIGH': 'slv_ch2_high',
    }),
    'SAT': ('satellites', False, set(), {
        'MIN_N': 'min_n',
        'MEAN_N': 'mean_n',
        'MAX_N': 'max_n',
        'MIN_SIGNAL': 'min_signal',
        'MEAN_SIGNAL': 'mean_signal',
        'MAX_SIGNAL': 'max_signal',
    }),
    'WTR': ('weather', False, set(), {
        'WTR_TEMP_INSIDE': 'temp_inside',
        'WTR_TEMP_OUTSIDE': 'temp_outside',
        'WTR_HUMIDITY_INSIDE': 'humidity_inside',
        'WTR_HUMIDITY_OUTSIDE': 'humidity_outside',
        'WTR_BAROMETER': 'barometer',
        'WTR_WIND_DIR': 'wind_dir',
        'WTR_WIND_SPEED': 'wind_speed',
        'WTR_SOLAR_RAD': 'solar_rad',
        'WTR_UV': 'uv',
        'WTR_ET': 'evapotranspiration',
        'WTR_RAIN_RATE': 'rain_rate',
        'WTR_HEAT_INDEX': 'heat_index',
        'WTR_DEW_POINT': 'dew_point',
        'WTR_WIND_CHILL': 'wind_chill',
    }),
    'WER': ('weather_errors', False, {'WER_ERRMSG'}, {
        'WER_ERRMSG': 'messages',
    }),
    'WCG': ('weather_config', False, {'WCG_HELP_URL', 'WCG_DATABASE_NAME'}, {
        'WCG_COM_PORT': 'com_port',
        'WCG_BAUD_RATE': 'baud_rate',
        'WCG_STATION_ID': 'station_id',
        'WCG_DATABASE_NAME': 'database_name',
        'WCG_HELP_URL': 'help_url',
        'WCG_DAQ_MODE': 'daq_mode',
        'WCG_LATITUDE': 'latitude',
        'WCG_LONGITUDE': 'longitude',
        'WCG_ALTITUDE': 'altitude',
        'WCG_TEMPERATURE_INSIDE': 'temperature_inside',
        'WCG_TEMPERATURE_OUTSIDE': 'temperature_outside',
        'WCG_HUMIDITY_INSIDE': 'humidity_inside',
        'WCG_HUMIDITY_OUTSIDE': 'humidity_outside',
        'WCG_BAROMETER': 'barometer',
        'WCG_WIND_DIRECTION': 'wind_direction',
        'WCG_WIND_SPEED': 'wind_speed',
        'WCG_SOLAR_RADIATION': 'solar_radiation',
        'WCG_UV_INDEX': 'uv_index',
        'WCG_EVAPOTRANSPIRATION': 'evapotranspiration',
        'WCG_RAIN_RATE': 'rain_rate',
        'WCG_HEAT_INDEX': 'heat_index',
        'WCG_DEW_POINT': 'dew_point',
        'WCG_WIND_CHILL': 'wind_chill',
        'WCG_OFFSET_INSIDE_TEMPERATURE': 'offset_inside_temperature',
        'WCG_OFFSET_OUTSIDE_TEMPERATURE': 'offset_outside_temperature',
        'WCG_OFFSET_INSIDE_HUMIDITY': 'offset_inside_humidity',
        'WCG_OFFSET_OUTSIDE_HUMIDITY': 'offset_outside_humidity',
        'WCG_OFFSET_WIND_DIRECTION': 'offset_wind_direction',
        'WCG_OFFSET_STATION_ALTITUDE': 'offset_station_altitude',
        'WCG_OFFSET_BAR_SEA_LEVEL': 'offset_bar_sea_level',
    }),
    'LIT': ('lightning', False, set(), {
        'LIT_CORR_DIST': 'corr_distance',
        'LIT_UNCORR_DIST': 'uncorr_distance',
        'LIT_UNCORR_ANGLE': 'uncorr_angle',  # fixed (docs/FORMAT.md, section 5)
        'LIT_CORR_ANGLE': 'corr_angle',  # fixed (docs/FORMAT.md, section 5)
    }),
    'LER': ('lightning_errors', False, {'LER_ERRMSG'}, {
        'LER_ERRMSG': 'messages',
    }),
    'LCG': ('lightning_config', False, {'LCG_HELP_URL', 'LCG_DATABASE_NAME'}, {
        'LCG_COM_PORT': 'com_port',
        'LCG_BAUD_RATE': 'baud_rate',
        'LCG_STATION_ID': 'station_id',
        'LCG_DATABASE_NAME': 'database_name',
        'LCG_HELP_URL': 'help_url',
        'LCG_DAQ_MODE': 'daq_mode',
        'LCG_LATITUDE': 'latitude',
        'LCG_LONGITUDE': 'longitude',
        'LCG_ALTITUDE': 'altitude',
        'LCG_SQUELCH_SETTING': 'squelch_seting',  # fixed (docs/FORMAT.md, section 5)
        'LCG_CLOSE_ALARM_DISTANCE': 'close_alarm_distance',
        'LCG_SEVERE_ALARM_DISTANCE': 'severe_alarm_distance',
        'LCG_NOISE_BEEP': 'noise_beep',
        'LCG_MINIMUM_GPS_SPEED': 'minimum_gps_speed',
        'LCG_ANGLE_CORRECTION': 'angle_correction',
    }),
    'LST': ('lightning_status', False, set(), {
        'LST_CLOSE_RATE': 'close_rate',
        'LST_TOTAL_RATE': 'total_rate',
        'LST_CLOSE_ALARM': 'close_alarm',
        'LST_SEVERE_ALARM': 'sever_alarm',  # fixed (docs/FORMAT.md, section 5)
        'LST_CURR_HEADING': 'current_heading',
    }),
    'LNS': ('lightning_noise', False, set(), {
    }),
}


#: The reference's mapping named columns that do not exist; the codes must land here.
LIGHTNING_FIXES = {
    ("LIT", "LIT_UNCORR_ANGLE"): "uncorr_angle",
    ("LIT", "LIT_CORR_ANGLE"): "corr_angle",
    ("LCG", "LCG_SQUELCH_SETTING"): "squelch_seting",
    ("LST", "LST_SEVERE_ALARM"): "sever_alarm",
}


def test_fourteen_types_one_table_each() -> None:
    assert set(EVENT_TYPES) == set(TYPE_EXPECTATIONS)
    assert set(TABLES) == set(TABLE_EXPECTATIONS)
    assert len(TABLE_NAMES) == 14
    for code, (table, *_rest) in TYPE_EXPECTATIONS.items():
        assert EVENT_TYPES[code].table == table
        assert TABLES[table] is EVENT_TYPES[code]


@pytest.mark.parametrize("table", sorted(TABLE_EXPECTATIONS))
def test_table_columns_match_the_spec_exactly(table: str) -> None:
    title, columns = TABLE_EXPECTATIONS[table]
    event_type = TABLES[table]
    assert event_type.title == title
    assert [c.name for c in event_type.columns] == [c[0] for c in columns]
    for column, (name, dtype, shape, fill) in zip(event_type.columns, columns, strict=True):
        assert column.name == name
        assert column.np_dtype == np.dtype(dtype), name
        assert column.shape == shape, name
        assert column.fill == fill and type(column.fill) is type(fill), name
        assert column.typed_fill.dtype == np.dtype(dtype), name

    expected = np.dtype([(name, dtype, shape) for name, dtype, shape, _ in columns])
    assert event_type.dtype == expected
    assert event_type.dtype.names == tuple(c[0] for c in columns)
    fills = event_type.fill_row
    for name, _, _, fill in columns:
        assert np.all(fills[name] == fill), name


@pytest.mark.parametrize("code", sorted(TYPE_EXPECTATIONS))
def test_upload_codes_match_the_spec(code: str) -> None:
    table, extended, blobs, mapping = TYPE_EXPECTATIONS[code]
    assert EVENT_TYPES[code].table == table
    event_type = EVENT_TYPES[code]
    assert event_type.extended_time is extended
    assert set(event_type.blob_codes) == blobs
    assert dict(event_type.codes) == mapping
    has_ext = {"nanoseconds", "ext_timestamp"} <= set(event_type.column_map)
    assert has_ext is extended


@pytest.mark.parametrize("code", sorted(TYPE_EXPECTATIONS))
def test_every_mapped_code_lands_in_an_existing_column(code: str) -> None:
    event_type = EVENT_TYPES[code]
    for upload_code, column in event_type.codes.items():
        assert column in event_type.column_map, (upload_code, column)
    for concrete, field in event_type.fields.items():
        column = event_type.column_map[field.column]
        if field.element is None:
            assert column.shape == ()
            assert event_type.codes[concrete] == field.column
        else:
            assert concrete[:-1] in event_type.codes
            assert 0 <= field.element < column.shape[0]
            assert int(concrete[-1]) == field.element + 1
        assert field.blob == ((concrete[:-1] if field.element is not None else concrete)
                              in event_type.blob_codes)


def test_lightning_defects_are_fixed_without_renaming_columns() -> None:
    for (code, upload_code), column in LIGHTNING_FIXES.items():
        field = EVENT_TYPES[code].fields[upload_code]
        assert field.column == column
        assert column in EVENT_TYPES[code].column_map


def test_indexed_codes_expand_to_elements() -> None:
    fields = EVENT_TYPES["CIC"].fields
    assert fields["PH3"].column == "pulseheights" and fields["PH3"].element == 2
    assert fields["TR1"].column == "traces" and fields["TR1"].element == 0
    assert fields["TR4"].blob and fields["TR4"].base64
    assert not fields["TRIGPATTERN"].blob and fields["TRIGPATTERN"].element is None
    for absent in ("PH", "PH0", "PH5", "TR", "RED1"):
        assert absent not in fields
    assert len(fields) == 3 + 6 * 4


def test_blob_columns_are_int32_with_fill_minus_one() -> None:
    for event_type in EVENT_TYPES.values():
        for field in event_type.fields.values():
            if field.blob:
                column = event_type.column_map[field.column]
                assert column.np_dtype == np.dtype("<i4") and column.fill == -1


def test_non_blob_codes_only_in_traces_are_base64() -> None:
    base64 = {(t.upload_code, c) for t in EVENT_TYPES.values() for c in t.base64_codes}
    assert base64 == {("CIC", "TR")}


def test_a_code_for_a_missing_column_is_refused() -> None:
    broken = EventType(
        upload_code="XXX",
        table="xxx",
        title="broken",
        extended_time=False,
        columns=(Column("event_id", "<u4"), Column("timestamp", "<i4"), Column("a", "<i2")),
        codes={"XXX_A": "a", "XXX_B": "b_does_not_exist"},
    )
    with pytest.raises(ValueError, match="b_does_not_exist"):
        schema._validate(broken)


def test_node_names_and_titles() -> None:
    assert schema.cluster_node("Amsterdam") == "cluster_amsterdam"
    assert schema.cluster_title("Amsterdam") == "HiSPARC cluster Amsterdam data"
    assert schema.station_node(501) == "station_501"
    assert schema.station_title(501) == "HiSPARC station 501 data"
    assert (schema.ROOT_GROUP, schema.ROOT_TITLE) == ("hisparc", "HiSPARC data")
    assert (schema.BLOBS_NODE, schema.BLOBS_TITLE) == ("blobs", "HiSPARC binary data")
