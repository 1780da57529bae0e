//! The mapping between [`Message`](super::Message) and AMQP properties/headers.
//! (Filled in with the RabbitMQ backend.)
