"""Wire formats: Confluent Avro and Debezium JSON, and the schema registry client."""
