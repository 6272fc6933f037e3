//! JSON records ⇄ Arrow arrays, with plain Arrow types that DuckDB and pandas read.
//!
//! Writing infers one schema from all records: integers become Int64, numbers with a
//! fraction Float64 (a column mixing both is Float64), strings Utf8, booleans Boolean, arrays
//! List, objects Struct (fields in order of first appearance). A column whose values have
//! incompatible types (a string here, a number there) is stored as Utf8 holding JSON text, and
//! a column that is always null as a null Utf8 column.

use super::Record;
use anyhow::{anyhow, bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Fields, Schema};
use serde_json::{Map, Number, Value};
use std::sync::Arc;

/// The JSON type of a column, as inferred from the values seen.
#[derive(Clone, Debug, PartialEq)]
enum JType {
    Null,
    Bool,
    Int,
    Float,
    Str,
    List(Box<JType>),
    Struct(Vec<(String, JType)>),
    /// Incompatible values: stored as JSON text.
    Json,
}

fn infer(v: &Value) -> JType {
    match v {
        Value::Null => JType::Null,
        Value::Bool(_) => JType::Bool,
        Value::Number(n) if n.is_i64() => JType::Int,
        Value::Number(_) => JType::Float,
        Value::String(_) => JType::Str,
        Value::Array(items) => {
            JType::List(Box::new(items.iter().map(infer).fold(JType::Null, merge)))
        }
        Value::Object(map) => {
            JType::Struct(map.iter().map(|(k, v)| (k.clone(), infer(v))).collect())
        }
    }
}

fn merge(a: JType, b: JType) -> JType {
    use JType::*;
    match (a, b) {
        (Null, x) | (x, Null) => x,
        (Int, Float) | (Float, Int) => Float,
        (List(x), List(y)) => List(Box::new(merge(*x, *y))),
        (Struct(mut xs), Struct(ys)) => {
            for (k, t) in ys {
                match xs.iter_mut().find(|(n, _)| *n == k) {
                    Some((_, cur)) => *cur = merge(std::mem::replace(cur, Null), t),
                    None => xs.push((k, t)),
                }
            }
            Struct(xs)
        }
        (x, y) if x == y => x,
        _ => Json,
    }
}

fn data_type(t: &JType) -> DataType {
    match t {
        JType::Null | JType::Str | JType::Json => DataType::Utf8,
        JType::Bool => DataType::Boolean,
        JType::Int => DataType::Int64,
        JType::Float => DataType::Float64,
        JType::List(inner) => DataType::List(Arc::new(Field::new("item", data_type(inner), true))),
        JType::Struct(fields) => DataType::Struct(struct_fields(fields)),
    }
}

fn struct_fields(fields: &[(String, JType)]) -> Fields {
    fields
        .iter()
        .map(|(n, t)| Field::new(n, data_type(t), true))
        .collect()
}

fn present<'a>(v: &Option<&'a Value>) -> Option<&'a Value> {
    v.filter(|v| !v.is_null())
}

fn build(t: &JType, vals: &[Option<&Value>]) -> ArrayRef {
    match t {
        JType::Null => Arc::new(StringArray::new_null(vals.len())),
        JType::Bool => Arc::new(
            vals.iter()
                .map(|v| present(v).and_then(Value::as_bool))
                .collect::<BooleanArray>(),
        ),
        JType::Int => Arc::new(
            vals.iter()
                .map(|v| present(v).and_then(Value::as_i64))
                .collect::<Int64Array>(),
        ),
        JType::Float => Arc::new(
            vals.iter()
                .map(|v| present(v).and_then(Value::as_f64))
                .collect::<Float64Array>(),
        ),
        JType::Str => Arc::new(
            vals.iter()
                .map(|v| present(v).and_then(Value::as_str))
                .collect::<StringArray>(),
        ),
        JType::Json => Arc::new(
            vals.iter()
                .map(|v| {
                    present(v).map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                })
                .collect::<StringArray>(),
        ),
        JType::List(inner) => {
            let mut offsets = Vec::with_capacity(vals.len() + 1);
            let mut children: Vec<Option<&Value>> = Vec::new();
            let mut valid = Vec::with_capacity(vals.len());
            offsets.push(0i32);
            for v in vals {
                if let Some(Value::Array(items)) = present(v) {
                    children.extend(items.iter().map(Some));
                    valid.push(true);
                } else {
                    valid.push(false);
                }
                offsets.push(children.len() as i32);
            }
            let field = Arc::new(Field::new("item", data_type(inner), true));
            Arc::new(ListArray::new(
                field,
                OffsetBuffer::new(ScalarBuffer::from(offsets)),
                build(inner, &children),
                Some(valid.into()),
            ))
        }
        JType::Struct(fields) => {
            let children = fields
                .iter()
                .map(|(name, ft)| {
                    let sub: Vec<Option<&Value>> = vals
                        .iter()
                        .map(|v| present(v).and_then(|o| o.get(name)))
                        .collect();
                    build(ft, &sub)
                })
                .collect();
            let valid: Vec<bool> = vals.iter().map(|v| present(v).is_some()).collect();
            Arc::new(StructArray::new(
                struct_fields(fields),
                children,
                Some(valid.into()),
            ))
        }
    }
}

/// Infers one schema from records seen one at a time (so a tool can learn the schema in a first
/// pass and then stream a Parquet file in a second).
#[derive(Clone, Debug)]
pub struct SchemaInfer(JType);

impl Default for SchemaInfer {
    fn default() -> Self {
        SchemaInfer(JType::Struct(Vec::new()))
    }
}

/// Top-level fields whose values were all null take the type cf gives them (schema.rs).
fn typed_nulls(fields: &[(String, JType)]) -> Vec<(String, JType)> {
    fields
        .iter()
        .map(|(n, t)| {
            let t = match (t, super::schema::known_float(n)) {
                (JType::Null, Some(true)) => JType::Float,
                (JType::Null, Some(false)) => JType::Int,
                _ => t.clone(),
            };
            (n.clone(), t)
        })
        .collect()
}

impl SchemaInfer {
    pub fn push(&mut self, rec: &Record) {
        let t = JType::Struct(rec.iter().map(|(k, v)| (k.clone(), infer(v))).collect());
        self.0 = merge(std::mem::replace(&mut self.0, JType::Null), t);
    }

    pub fn schema(&self) -> Arc<Schema> {
        let JType::Struct(fields) = &self.0 else {
            unreachable!()
        };
        Arc::new(Schema::new(struct_fields(&typed_nulls(fields))))
    }
}

/// The Arrow schema that holds all `records`.
pub fn schema_for(records: &[Record]) -> Arc<Schema> {
    let t = records
        .iter()
        .map(|r| JType::Struct(r.iter().map(|(k, v)| (k.clone(), infer(v))).collect()))
        .fold(JType::Struct(Vec::new()), merge);
    let JType::Struct(fields) = t else {
        unreachable!()
    };
    Arc::new(Schema::new(struct_fields(&typed_nulls(&fields))))
}

/// Records as one Arrow batch of `schema` (from [`schema_for`] over a superset of them).
pub fn records_to_batch(schema: &Arc<Schema>, records: &[Record]) -> Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let vals: Vec<Option<&Value>> = records.iter().map(|r| r.get(f.name())).collect();
            build(&jtype_of(f.data_type()), &vals)
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The JType that [`data_type`] maps to `dt` (Utf8 columns hold strings; values that are not
/// strings in them are written as JSON text).
fn jtype_of(dt: &DataType) -> JType {
    match dt {
        DataType::Boolean => JType::Bool,
        DataType::Int64 => JType::Int,
        DataType::Float64 => JType::Float,
        DataType::List(f) => JType::List(Box::new(jtype_of(f.data_type()))),
        DataType::Struct(fs) => JType::Struct(
            fs.iter()
                .map(|f| (f.name().clone(), jtype_of(f.data_type())))
                .collect(),
        ),
        _ => JType::Json,
    }
}

/// Every row of an Arrow batch as a JSON record.
pub fn batch_to_records(batch: &RecordBatch) -> Result<Vec<Record>> {
    let schema = batch.schema();
    let mut rows: Vec<Record> = (0..batch.num_rows()).map(|_| Map::new()).collect();
    for (field, col) in schema.fields().iter().zip(batch.columns()) {
        for (i, row) in rows.iter_mut().enumerate() {
            let v =
                value(col.as_ref(), i).map_err(|e| anyhow!("column \"{}\": {e}", field.name()))?;
            row.insert(field.name().clone(), v);
        }
    }
    Ok(rows)
}

fn num(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// One element of an Arrow array as JSON.
fn value(a: &dyn Array, i: usize) -> Result<Value> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float16 => num(a.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => num(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => num(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut map = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                map.insert(f.name().clone(), value(col.as_ref(), i)?);
            }
            Value::Object(map)
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let key = d.normalized_keys()[i];
            value(d.values().as_ref(), key)?
        }
        other => bail!("unsupported Arrow type {other}"),
    })
}

fn list(items: &dyn Array) -> Result<Value> {
    (0..items.len())
        .map(|j| value(items, j))
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(v: Value) -> Record {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn round_trip_keeps_values() {
        let records = vec![
            rec(json!({"text": "a", "token_ids": [1, 2, 3], "logprob": -1.5, "meta": {"k": 1}})),
            rec(json!({"text": "b", "token_ids": [], "logprob": -2, "extra": true})),
            rec(json!({"text": null, "token_ids": null, "logprob": 0.25, "mixed": "x"})),
            rec(json!({"text": "d", "token_ids": [4], "logprob": 1, "mixed": 3})),
        ];
        let schema = schema_for(&records);
        assert_eq!(
            schema.field_with_name("token_ids").unwrap().data_type(),
            &DataType::List(Arc::new(Field::new("item", DataType::Int64, true)))
        );
        assert_eq!(
            schema.field_with_name("logprob").unwrap().data_type(),
            &DataType::Float64
        );
        assert_eq!(
            schema.field_with_name("mixed").unwrap().data_type(),
            &DataType::Utf8
        );
        let batch = records_to_batch(&schema, &records).unwrap();
        let back = batch_to_records(&batch).unwrap();
        assert_eq!(back[0]["token_ids"], json!([1, 2, 3]));
        assert_eq!(back[0]["meta"], json!({"k": 1}));
        assert_eq!(back[1]["logprob"], json!(-2.0));
        assert_eq!(back[1]["extra"], json!(true));
        assert_eq!(back[0]["extra"], Value::Null);
        assert_eq!(back[2]["text"], Value::Null);
        assert_eq!(back[3]["mixed"], json!("3"));
    }
}
