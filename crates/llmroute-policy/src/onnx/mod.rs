//! Writing ONNX models from Rust: the protobuf messages (`proto`) and a small graph builder
//! used by the encoder and the policy exporter. Models are written at IR version 8 with the
//! default-domain opset 17, which ONNX Runtime 1.31 runs and which has `LayerNormalization`.

pub mod proto;

use prost::Message;
use proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto, attribute_type, data_type,
};

/// ONNX IR version written into every model.
pub const IR_VERSION: i64 = 8;
/// Default-domain operator set version written into every model.
pub const OPSET_VERSION: i64 = 17;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, Copy)]
pub enum Dim {
    Fixed(i64),
    /// A dimension fixed only at run time, such as the batch size.
    Symbolic(&'static str),
}

/// Builds one ONNX graph node by node. Intermediate values get unique generated names.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next_id: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }

    /// Declares a graph input and returns its name.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem_type, dims));
        name.to_string()
    }

    /// Declares an existing value as a graph output.
    pub fn output(&mut self, name: &str, elem_type: i32, dims: &[Dim]) {
        self.outputs.push(value_info(name, elem_type, dims));
    }

    /// Adds a float tensor constant, stored as raw little-endian bytes, and returns its name.
    pub fn initializer_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let expected: usize = dims.iter().product();
        assert_eq!(
            expected,
            values.len(),
            "initializer {name}: shape {dims:?} does not match {} values",
            values.len()
        );
        let mut raw_data = Vec::with_capacity(values.len() * 4);
        for value in values {
            raw_data.extend_from_slice(&value.to_le_bytes());
        }
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.to_string(),
            raw_data,
            ..TensorProto::default()
        });
        name.to_string()
    }

    /// Adds an int64 tensor constant (shapes, axes, indices) and returns its name.
    pub fn initializer_i64(&mut self, name: &str, dims: &[usize], values: &[i64]) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::INT64,
            name: name.to_string(),
            int64_data: values.to_vec(),
            ..TensorProto::default()
        });
        name.to_string()
    }

    /// Adds a node with one output and returns the output's generated name.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.next_id += 1;
        let output = format!("{}_{}", op_type.to_lowercase(), self.next_id);
        self.node_with_outputs(op_type, inputs, &[&output], attributes);
        output
    }

    /// Adds a node whose outputs have the given names (for graph outputs).
    pub fn node_with_outputs(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        self.next_id += 1;
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{op_type}_{}", self.next_id),
            op_type: op_type.to_string(),
            attribute: attributes,
            ..NodeProto::default()
        });
    }

    /// Wraps the graph in a model with llmroute's producer name and the given metadata.
    pub fn finish(self, doc_string: &str, metadata: &[(&str, String)]) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET_VERSION,
            }],
            producer_name: "llmroute".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            doc_string: doc_string.to_string(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..GraphProto::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(key, value)| StringStringEntryProto {
                    key: key.to_string(),
                    value: value.clone(),
                })
                .collect(),
            ..ModelProto::default()
        }
    }
}

/// Serialises a model to the bytes of an `.onnx` file.
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Parses the bytes of an `.onnx` file, keeping only the fields this module defines.
pub fn decode(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match *d {
                Dim::Fixed(size) => DimensionValue::DimValue(size),
                Dim::Symbolic(param) => DimensionValue::DimParam(param.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        doc_string: String::new(),
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_type::INT,
        i: value,
        ..AttributeProto::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_type::FLOAT,
        f: value,
        ..AttributeProto::default()
    }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_type::INTS,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_type::STRING,
        s: value.as_bytes().to_vec(),
        ..AttributeProto::default()
    }
}

/// Builds a constant-tensor attribute (for `Constant` nodes).
pub fn attr_tensor(name: &str, tensor: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_type::TENSOR,
        t: Some(tensor),
        ..AttributeProto::default()
    }
}

/// Floats attribute, for completeness with `attr_ints`.
pub fn attr_floats(name: &str, values: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: attribute_type::FLOATS,
        floats: values.to_vec(),
        ..AttributeProto::default()
    }
}

/// Element type constants re-exported for builders.
pub use proto::data_type::{FLOAT, INT32, INT64};
