//! Broker over RabbitMQ (lapin): durable queues, publisher confirms, dead-lettering.
