//! Arrow columns ↔ JSON values, so that Parquet rows go through the same field mapping as
//! JSONL rows. Reading supports the types datasets are published with (strings, integers,
//! floats, booleans, lists and structs); writing infers a schema from JSON rows.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde_json::{Map, Number, Value};

/// The JSON value of `array[i]` (`Null` for a null cell).
pub fn value_at(array: &dyn Array, i: usize) -> Result<Value, String> {
    use arrow::array::AsArray;
    use arrow::datatypes::*;
    if array.is_null(i) {
        return Ok(Value::Null);
    }
    let num = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => Value::from(array.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => Value::from(array.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Value::from(array.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(array.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => num(array.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => num(array.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::from(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(array.as_string_view().value(i)),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                let v = value_at(col.as_ref(), i)?;
                if !v.is_null() {
                    m.insert(f.name().clone(), v);
                }
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported column type {other}")),
    })
}

fn list(values: &dyn Array) -> Result<Value, String> {
    (0..values.len())
        .map(|j| value_at(values, j))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// Every cell of a column as JSON (`Null` for null cells), converting column by column.
pub fn column_values(array: &dyn Array) -> Result<Vec<Value>, String> {
    use arrow::array::AsArray;
    use arrow::datatypes::*;
    let n = array.len();
    let valid = |i: usize| array.is_valid(i);
    macro_rules! prim {
        ($t:ty, $conv:expr) => {{
            let a = array.as_primitive::<$t>();
            (0..n)
                .map(|i| {
                    if valid(i) {
                        $conv(a.value(i))
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }};
    }
    let num = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match array.data_type() {
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            (0..n)
                .map(|i| {
                    if valid(i) {
                        Value::from(a.value(i))
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            (0..n)
                .map(|i| {
                    if valid(i) {
                        Value::from(a.value(i))
                    } else {
                        Value::Null
                    }
                })
                .collect()
        }
        DataType::Int64 => prim!(Int64Type, Value::from),
        DataType::Int32 => prim!(Int32Type, Value::from),
        DataType::UInt64 => prim!(UInt64Type, Value::from),
        DataType::UInt32 => prim!(UInt32Type, Value::from),
        DataType::Float64 => prim!(Float64Type, num),
        DataType::Float32 => prim!(Float32Type, |x: f32| num(x as f64)),
        _ => (0..n)
            .map(|i| value_at(array, i))
            .collect::<Result<Vec<_>, _>>()?,
    })
}

/// The rows of a batch as JSON objects (null cells left out).
pub fn rows(batch: &RecordBatch) -> Result<Vec<Map<String, Value>>, String> {
    let schema = batch.schema();
    let mut out = vec![Map::new(); batch.num_rows()];
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        let values =
            column_values(col.as_ref()).map_err(|e| format!("column `{}`: {e}", field.name()))?;
        for (row, v) in out.iter_mut().zip(values) {
            if !v.is_null() {
                row.insert(field.name().clone(), v);
            }
        }
    }
    Ok(out)
}

/// The Arrow type that holds every non-null value (mixed kinds fall back to JSON text).
fn infer(values: &[&Value]) -> DataType {
    let present: Vec<&Value> = values.iter().copied().filter(|v| !v.is_null()).collect();
    if present.is_empty() {
        return DataType::Utf8;
    }
    if present.iter().all(|v| v.is_boolean()) {
        DataType::Boolean
    } else if present.iter().all(|v| v.is_i64()) {
        DataType::Int64
    } else if present.iter().all(|v| v.is_number()) {
        DataType::Float64
    } else if present.iter().all(|v| v.is_string()) {
        DataType::Utf8
    } else if present.iter().all(|v| v.is_array()) {
        let items: Vec<&Value> = present
            .iter()
            .flat_map(|v| v.as_array().expect("array"))
            .collect();
        DataType::List(Arc::new(Field::new("item", infer(&items), true)))
    } else if present.iter().all(|v| v.is_object()) {
        let mut keys: Vec<&String> = Vec::new();
        for v in &present {
            for k in v.as_object().expect("object").keys() {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        let fields: Vec<Field> = keys
            .into_iter()
            .map(|k| {
                let vals: Vec<&Value> = present
                    .iter()
                    .map(|v| v.get(k).unwrap_or(&Value::Null))
                    .collect();
                Field::new(k, infer(&vals), true)
            })
            .collect();
        DataType::Struct(Fields::from(fields))
    } else {
        DataType::Utf8
    }
}

fn build(dt: &DataType, values: &[&Value]) -> ArrayRef {
    let nulls = || NullBuffer::from(values.iter().map(|v| !v.is_null()).collect::<Vec<bool>>());
    match dt {
        DataType::Boolean => Arc::new(BooleanArray::from(
            values.iter().map(|v| v.as_bool()).collect::<Vec<_>>(),
        )),
        DataType::Int64 => Arc::new(Int64Array::from(
            values.iter().map(|v| v.as_i64()).collect::<Vec<_>>(),
        )),
        DataType::Float64 => Arc::new(Float64Array::from(
            values.iter().map(|v| v.as_f64()).collect::<Vec<_>>(),
        )),
        DataType::List(field) => {
            let mut offsets = vec![0i32];
            let mut items: Vec<&Value> = Vec::new();
            for v in values {
                if let Some(a) = v.as_array() {
                    items.extend(a.iter());
                }
                offsets.push(items.len() as i32);
            }
            let child = build(field.data_type(), &items);
            Arc::new(ListArray::new(
                field.clone(),
                OffsetBuffer::new(offsets.into()),
                child,
                Some(nulls()),
            ))
        }
        DataType::Struct(fields) => {
            let children: Vec<ArrayRef> = fields
                .iter()
                .map(|f| {
                    let vals: Vec<&Value> = values
                        .iter()
                        .map(|v| v.get(f.name()).unwrap_or(&Value::Null))
                        .collect();
                    build(f.data_type(), &vals)
                })
                .collect();
            Arc::new(StructArray::new(fields.clone(), children, Some(nulls())))
        }
        _ => Arc::new(StringArray::from(
            values
                .iter()
                .map(|v| match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                })
                .collect::<Vec<_>>(),
        )),
    }
}

/// A record batch from JSON rows; columns in order of first appearance, types inferred.
pub fn batch_from_rows(rows: &[Map<String, Value>]) -> Result<RecordBatch, String> {
    let mut keys: Vec<&String> = Vec::new();
    for r in rows {
        for k in r.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for k in keys {
        let vals: Vec<&Value> = rows
            .iter()
            .map(|r| r.get(k).unwrap_or(&Value::Null))
            .collect();
        let dt = infer(&vals);
        columns.push(build(&dt, &vals));
        fields.push(Field::new(k, dt, true));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}
