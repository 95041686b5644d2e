//! The subset of TensorFlow's event protos, the HParams plugin protos and
//! `google/protobuf/struct.proto` that the writer emits, derived by hand so that
//! no `protoc` or build script is needed. Field numbers follow
//! `tensorflow/core/util/event.proto`, `tensorflow/core/framework/{summary,tensor,
//! tensor_shape}.proto` and `tensorboard/plugins/hparams/{api,plugin_data}.proto`;
//! fields the writer never sets are left out, which protobuf readers accept.

use std::collections::BTreeMap;

/// `tensorflow.DataType.DT_FLOAT`.
pub const DT_FLOAT: i32 = 1;
/// `tensorflow.DataType.DT_STRING`: text summaries and the custom-scalars layout.
pub const DT_STRING: i32 = 7;
/// `tensorboard.hparams.DataType` values.
pub const DATA_TYPE_STRING: i32 = 1;
pub const DATA_TYPE_BOOL: i32 = 2;
pub const DATA_TYPE_FLOAT64: i32 = 3;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "event::What", tags = "3, 5, 7")]
    pub what: Option<event::What>,
}

pub mod event {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(super::Summary),
        /// Field 7: field 6 is the deprecated `log_message`, which readers ignore.
        #[prost(message, tag = "7")]
        SessionLog(super::SessionLog),
    }
}

/// `tensorflow.SessionLog`: a START at step s tells readers to drop everything an earlier
/// process logged at steps >= s (the restart after a crash).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub checkpoint_path: String,
    #[prost(string, tag = "3")]
    pub msg: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "summary_value::Kind", tags = "2, 4, 8")]
    pub value: Option<summary_value::Kind>,
}

pub mod summary_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "4")]
        Image(super::SummaryImage),
        #[prost(message, tag = "8")]
        Tensor(super::TensorProto),
    }
}

/// `tensorflow.Summary.Image`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grey, 3 RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<TensorShapeDim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeDim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `tensorboard.hparams.HParamsPluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(oneof = "hparams_plugin_data::Data", tags = "2, 3, 4")]
    pub data: Option<hparams_plugin_data::Data>,
}

pub mod hparams_plugin_data {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Data {
        #[prost(message, tag = "2")]
        Experiment(super::Experiment),
        #[prost(message, tag = "3")]
        SessionStartInfo(super::SessionStartInfo),
        #[prost(message, tag = "4")]
        SessionEndInfo(super::SessionEndInfo),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Experiment {
    #[prost(double, tag = "3")]
    pub time_created_secs: f64,
    #[prost(message, repeated, tag = "4")]
    pub hparam_infos: Vec<HParamInfo>,
    #[prost(message, repeated, tag = "5")]
    pub metric_infos: Vec<MetricInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    /// One of the `DATA_TYPE_*` constants.
    #[prost(int32, tag = "4")]
    pub r#type: i32,
    #[prost(oneof = "h_param_info::Domain", tags = "5, 6")]
    pub domain: Option<h_param_info::Domain>,
}

pub mod h_param_info {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Domain {
        #[prost(message, tag = "5")]
        Discrete(super::ListValue),
        #[prost(message, tag = "6")]
        Interval(super::Interval),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Interval {
    #[prost(double, tag = "1")]
    pub min_value: f64,
    #[prost(double, tag = "2")]
    pub max_value: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricInfo {
    #[prost(message, optional, tag = "1")]
    pub name: Option<MetricName>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricName {
    #[prost(string, tag = "1")]
    pub group: String,
    #[prost(string, tag = "2")]
    pub tag: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionStartInfo {
    #[prost(btree_map = "string, message", tag = "1")]
    pub hparams: BTreeMap<String, Value>,
    #[prost(string, tag = "4")]
    pub group_name: String,
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionEndInfo {
    /// `tensorboard.hparams.Status`.
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(double, tag = "2")]
    pub end_time_secs: f64,
}

/// `google.protobuf.Value`, without the null, struct and list kinds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(oneof = "value::Kind", tags = "2, 3, 4")]
    pub kind: Option<value::Kind>,
}

pub mod value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(double, tag = "2")]
        Number(f64),
        #[prost(string, tag = "3")]
        String(String),
        #[prost(bool, tag = "4")]
        Bool(bool),
    }
}

/// `google.protobuf.ListValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

/// `tensorboard.Layout` (plugins/custom_scalar/layout.proto): charts that combine tags.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Layout {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(message, repeated, tag = "2")]
    pub category: Vec<Category>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Category {
    #[prost(string, tag = "1")]
    pub title: String,
    #[prost(message, repeated, tag = "2")]
    pub chart: Vec<Chart>,
    #[prost(bool, tag = "3")]
    pub closed: bool,
}

/// A chart with one line per (run, tag) whose tag matches one of `tag`'s regexes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Chart {
    #[prost(string, tag = "1")]
    pub title: String,
    #[prost(message, optional, tag = "2")]
    pub multiline: Option<MultilineChartContent>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MultilineChartContent {
    #[prost(string, repeated, tag = "1")]
    pub tag: Vec<String>,
}
