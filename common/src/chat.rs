//! Chat templates rendered with MiniJinja, with the Python-compatible methods and the extra
//! functions that Hugging Face templates use (`raise_exception`, `strftime_now`).

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind, Value};

/// Render `template` for `messages` (a JSON array of `{role, content}`).
pub fn render(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", template)
        .map_err(|e| anyhow!("chat template: {e}"))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| anyhow!("chat template: {e}"))?;
    tmpl.render(context! {
        messages => Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| anyhow!("chat template: {e}"))
}

/// The text a template puts before a user message's content: the opening of an empty user
/// turn, from which Magpie-style sampling starts.
pub fn user_turn_opening(
    template: &str,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    const MARK: &str = "\u{1}CF_USER_CONTENT\u{1}";
    let messages = serde_json::json!([{"role": "user", "content": MARK}]);
    let text = render(template, &messages, false, bos_token, eos_token)?;
    let cut = text.find(MARK).ok_or_else(|| {
        anyhow!("chat template: the user message does not appear in the rendering")
    })?;
    Ok(text[..cut].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_and_opens_a_user_turn() {
        let m = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            render(CHATML, &m, true, None, None).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            user_turn_opening(CHATML, None, None).unwrap(),
            "<|im_start|>user\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'].strip() }}{% endfor %}";
        let ok = render(
            t,
            &serde_json::json!([{"role": "user", "content": "  x "}]),
            false,
            Some("<s>"),
            None,
        )
        .unwrap();
        assert_eq!(ok, "<s>x");
        let e = render(
            t,
            &serde_json::json!([{"role": "system", "content": "x"}]),
            false,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no system"), "{e}");
    }
}
