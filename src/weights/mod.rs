//! Model files to tensor views.
