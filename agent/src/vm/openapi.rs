//! A checker for JSON bodies against cloud-hypervisor's OpenAPI document,
//! for the tests. It reads the subset that document uses (`$ref`, `type`,
//! `required`, `properties`, `additionalProperties`, `items`, `enum`,
//! `minimum`) and is stricter than the document in one way: a property the
//! schema does not name is an error, so a misspelt field cannot pass.

use serde_json::Value;

pub struct OpenApi {
    schemas: Value,
}

impl OpenApi {
    pub fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../specs/cloud-hypervisor-openapi.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let document: Value = serde_yaml::from_str(&text).unwrap();
        Self {
            schemas: document["components"]["schemas"].clone(),
        }
    }

    /// Check `value` against the schema named `name`; the error names the
    /// offending field by its path.
    pub fn validate(&self, name: &str, value: &Value) -> Result<(), String> {
        let schema = self.named(name)?;
        self.check(schema, value, name)
    }

    fn named(&self, name: &str) -> Result<&Value, String> {
        self.schemas
            .get(name)
            .ok_or_else(|| format!("the document has no schema {name}"))
    }

    fn check(&self, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .ok_or_else(|| format!("{path}: an unsupported $ref {reference}"))?;
            return self.check(self.named(name)?, value, path);
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            return Err(format!("{path}: {value} is not one of {allowed:?}"));
        }
        let kind = schema.get("type").and_then(Value::as_str);
        match kind {
            Some("object") | None if schema.get("properties").is_some() || kind.is_some() => {
                self.check_object(schema, value, path)
            }
            Some("array") => {
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("{path}: expected an array, got {value}"))?;
                let item_schema = schema.get("items").unwrap_or(&Value::Null);
                for (i, item) in items.iter().enumerate() {
                    self.check(item_schema, item, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            Some("string") if !value.is_string() => {
                Err(format!("{path}: expected a string, got {value}"))
            }
            Some("boolean") if !value.is_boolean() => {
                Err(format!("{path}: expected a boolean, got {value}"))
            }
            Some("integer") => {
                let n = value
                    .as_i64()
                    .or_else(|| value.as_u64().map(|n| n as i64))
                    .ok_or_else(|| format!("{path}: expected an integer, got {value}"))?;
                match schema.get("minimum").and_then(Value::as_i64) {
                    Some(min) if n < min => Err(format!("{path}: {n} is below the minimum {min}")),
                    _ => Ok(()),
                }
            }
            Some("number") if !value.is_number() => {
                Err(format!("{path}: expected a number, got {value}"))
            }
            _ => Ok(()),
        }
    }

    fn check_object(&self, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
        let object = value
            .as_object()
            .ok_or_else(|| format!("{path}: expected an object, got {value}"))?;
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(required) {
                return Err(format!("{path}: the required field {required} is missing"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, field) in object {
            let field_path = format!("{path}.{key}");
            match (
                properties.and_then(|p| p.get(key)),
                schema.get("additionalProperties"),
            ) {
                (Some(field_schema), _) => self.check(field_schema, field, &field_path)?,
                (None, Some(extra)) if extra.is_object() => {
                    self.check(extra, field, &field_path)?
                }
                (None, _) => return Err(format!("{field_path}: the schema has no such field")),
            }
        }
        Ok(())
    }
}
