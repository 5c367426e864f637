//! The sample schema of DESIGN.md: one row per completion.
//!
//! | column | type |
//! |---|---|
//! | `sample_id`, `prompt_id`, `group_id`, `policy_version` | UInt64 |
//! | `prompt_ids`, `completion_ids` | List<UInt32> |
//! | `behavior_logprobs` | List<Float32> |
//! | `finish` | Dictionary<UInt8, Utf8> (`stop`, `length`, `error`) |
//! | `reward` | Float32 |
//! | `reward_parts` | Map<Utf8, Float32> |
//! | `completion_text` | Utf8 |

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, DictionaryArray, Float32Array, Float32Builder, ListBuilder, MapBuilder,
    RecordBatch, StringArray, StringBuilder, UInt32Builder, UInt64Array,
};
use arrow::datatypes::{
    DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type, UInt64Type, UInt8Type,
};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("sample batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("sample batch: column `{0}` missing or of the wrong type")]
    Column(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    Error,
}

impl Finish {
    pub const NAMES: [&'static str; 3] = ["stop", "length", "error"];

    fn index(self) -> u8 {
        match self {
            Finish::Stop => 0,
            Finish::Length => 1,
            Finish::Error => 2,
        }
    }

    fn from_name(s: &str) -> Option<Finish> {
        match s {
            "stop" => Some(Finish::Stop),
            "length" => Some(Finish::Length),
            "error" => Some(Finish::Error),
            _ => None,
        }
    }
}

/// One completion, as the learner consumes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub sample_id: u64,
    pub prompt_id: u64,
    pub group_id: u64,
    pub policy_version: u64,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub behavior_logprobs: Vec<f32>,
    pub finish: Finish,
    pub reward: f32,
    pub reward_parts: Vec<(String, f32)>,
    pub completion_text: String,
}

pub fn schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let map = DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(
                vec![
                    Field::new("key", DataType::Utf8, false),
                    Field::new("value", DataType::Float32, true),
                ]
                .into(),
            ),
            false,
        )),
        false,
    );
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new("prompt_id", DataType::UInt64, false),
        Field::new("group_id", DataType::UInt64, false),
        Field::new("policy_version", DataType::UInt64, false),
        Field::new("prompt_ids", list(DataType::UInt32), false),
        Field::new("completion_ids", list(DataType::UInt32), false),
        Field::new("behavior_logprobs", list(DataType::Float32), false),
        Field::new(
            "finish",
            DataType::Dictionary(Box::new(DataType::UInt8), Box::new(DataType::Utf8)),
            false,
        ),
        Field::new("reward", DataType::Float32, false),
        Field::new("reward_parts", map, false),
        Field::new("completion_text", DataType::Utf8, false),
    ]))
}

/// Builds one record batch from samples.
pub fn to_batch(samples: &[Sample]) -> Result<RecordBatch, SchemaError> {
    let u64s = |f: fn(&Sample) -> u64| {
        Arc::new(UInt64Array::from(samples.iter().map(f).collect::<Vec<_>>()))
    };
    let mut prompt_ids = ListBuilder::new(UInt32Builder::new());
    let mut completion_ids = ListBuilder::new(UInt32Builder::new());
    let mut logprobs = ListBuilder::new(Float32Builder::new());
    let mut parts = MapBuilder::new(None, StringBuilder::new(), Float32Builder::new());
    for s in samples {
        prompt_ids.append_value(s.prompt_ids.iter().map(|&x| Some(x)));
        completion_ids.append_value(s.completion_ids.iter().map(|&x| Some(x)));
        logprobs.append_value(s.behavior_logprobs.iter().map(|&x| Some(x)));
        for (k, v) in &s.reward_parts {
            parts.keys().append_value(k);
            parts.values().append_value(*v);
        }
        parts.append(true)?;
    }
    let finish = DictionaryArray::<UInt8Type>::try_new(
        samples
            .iter()
            .map(|s| s.finish.index())
            .collect::<Vec<u8>>()
            .into(),
        Arc::new(StringArray::from(Finish::NAMES.to_vec())),
    )?;
    let batch = RecordBatch::try_new(
        schema(),
        vec![
            u64s(|s| s.sample_id),
            u64s(|s| s.prompt_id),
            u64s(|s| s.group_id),
            u64s(|s| s.policy_version),
            Arc::new(prompt_ids.finish()),
            Arc::new(completion_ids.finish()),
            Arc::new(logprobs.finish()),
            Arc::new(finish),
            Arc::new(Float32Array::from(
                samples.iter().map(|s| s.reward).collect::<Vec<_>>(),
            )),
            Arc::new(parts.finish()),
            Arc::new(StringArray::from(
                samples
                    .iter()
                    .map(|s| s.completion_text.as_str())
                    .collect::<Vec<_>>(),
            )),
        ],
    )?;
    Ok(batch)
}

/// Reads samples back from a batch of this schema (extra columns are ignored).
pub fn from_batch(batch: &RecordBatch) -> Result<Vec<Sample>, SchemaError> {
    let col = |name: &'static str| batch.column_by_name(name).ok_or(SchemaError::Column(name));
    let u64s = |name: &'static str| -> Result<Vec<u64>, SchemaError> {
        Ok(col(name)?
            .as_primitive_opt::<UInt64Type>()
            .ok_or(SchemaError::Column(name))?
            .values()
            .to_vec())
    };
    let (sample_id, prompt_id, group_id, version) = (
        u64s("sample_id")?,
        u64s("prompt_id")?,
        u64s("group_id")?,
        u64s("policy_version")?,
    );
    let lists_u32 = |name: &'static str| -> Result<Vec<Vec<u32>>, SchemaError> {
        let l = col(name)?
            .as_list_opt::<i32>()
            .ok_or(SchemaError::Column(name))?;
        (0..l.len())
            .map(|i| {
                Ok(l.value(i)
                    .as_primitive_opt::<UInt32Type>()
                    .ok_or(SchemaError::Column(name))?
                    .values()
                    .to_vec())
            })
            .collect()
    };
    let (prompts, completions) = (lists_u32("prompt_ids")?, lists_u32("completion_ids")?);
    let lp = col("behavior_logprobs")?
        .as_list_opt::<i32>()
        .ok_or(SchemaError::Column("behavior_logprobs"))?;
    let finish = col("finish")?
        .as_dictionary_opt::<UInt8Type>()
        .ok_or(SchemaError::Column("finish"))?;
    let finish_names = finish
        .values()
        .as_string_opt::<i32>()
        .ok_or(SchemaError::Column("finish"))?;
    let reward = col("reward")?
        .as_primitive_opt::<Float32Type>()
        .ok_or(SchemaError::Column("reward"))?;
    let parts = col("reward_parts")?
        .as_map_opt()
        .ok_or(SchemaError::Column("reward_parts"))?;
    let text = col("completion_text")?
        .as_string_opt::<i32>()
        .ok_or(SchemaError::Column("completion_text"))?;
    (0..batch.num_rows())
        .map(|i| {
            let entries = parts.value(i);
            let keys = entries.column(0).as_string::<i32>();
            let values = entries.column(1).as_primitive::<Float32Type>();
            let finish_name = finish_names.value(finish.keys().value(i) as usize);
            Ok(Sample {
                sample_id: sample_id[i],
                prompt_id: prompt_id[i],
                group_id: group_id[i],
                policy_version: version[i],
                prompt_ids: prompts[i].clone(),
                completion_ids: completions[i].clone(),
                behavior_logprobs: lp
                    .value(i)
                    .as_primitive_opt::<Float32Type>()
                    .ok_or(SchemaError::Column("behavior_logprobs"))?
                    .values()
                    .to_vec(),
                finish: Finish::from_name(finish_name).ok_or(SchemaError::Column("finish"))?,
                reward: reward.value(i),
                reward_parts: (0..keys.len())
                    .map(|j| (keys.value(j).to_string(), values.value(j)))
                    .collect(),
                completion_text: text.value(i).to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u64) -> Sample {
        Sample {
            sample_id: i,
            prompt_id: i / 4,
            group_id: i / 4,
            policy_version: 3,
            prompt_ids: vec![1, 2, 3],
            completion_ids: (0..i as u32).collect(),
            behavior_logprobs: (0..i).map(|k| -0.1 * k as f32).collect(),
            finish: [Finish::Stop, Finish::Length, Finish::Error][i as usize % 3],
            reward: i as f32 * 0.5,
            reward_parts: vec![("answer".into(), 1.0), ("format".into(), 0.1 * i as f32)],
            completion_text: format!("completion {i} ✓"),
        }
    }

    #[test]
    fn batches_round_trip_with_the_documented_types() {
        let samples: Vec<Sample> = (0..7).map(sample).collect();
        let batch = to_batch(&samples).unwrap();
        assert_eq!(batch.schema(), schema());
        assert_eq!(from_batch(&batch).unwrap(), samples);
        let names: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(
            names,
            [
                "sample_id",
                "prompt_id",
                "group_id",
                "policy_version",
                "prompt_ids",
                "completion_ids",
                "behavior_logprobs",
                "finish",
                "reward",
                "reward_parts",
                "completion_text"
            ]
        );
        assert_eq!(to_batch(&[]).unwrap().num_rows(), 0);
    }
}
