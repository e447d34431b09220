//! Just enough XML for AWS query-API responses: a tree of elements with text.

use anyhow::{Result, bail};
use quick_xml::{Reader, events::Event};

#[derive(Debug, Default, Clone)]
pub struct Element {
    pub name: String,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn parse(xml: &[u8]) -> Result<Element> {
        let mut reader = Reader::from_reader(xml);
        let mut stack = vec![Element::default()];
        loop {
            match reader.read_event()? {
                Event::Start(start) => stack.push(Element {
                    name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
                    ..Default::default()
                }),
                Event::Empty(empty) => {
                    let element = Element {
                        name: String::from_utf8_lossy(empty.local_name().as_ref()).into_owned(),
                        ..Default::default()
                    };
                    stack.last_mut().expect("root").children.push(element);
                }
                Event::Text(text) => stack.last_mut().expect("root").text.push_str(&text.decode()?),
                Event::GeneralRef(reference) => {
                    let name = reference.decode()?;
                    let resolved = match name.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    };
                    stack.last_mut().expect("root").text.push_str(resolved);
                }
                Event::End(_) => {
                    let done = stack.pop().expect("element");
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => bail!("unbalanced XML"),
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let mut root = stack.pop().expect("root");
        Ok(if root.children.len() == 1 { root.children.remove(0) } else { root })
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Follow a path of child names.
    pub fn at(&self, path: &[&str]) -> Option<&Element> {
        path.iter().try_fold(self, |element, name| element.child(name))
    }

    pub fn text_at(&self, path: &[&str]) -> Option<String> {
        self.at(path).map(|e| e.text.trim().to_string())
    }

    /// The `<item>` children under a path (EC2's list encoding).
    pub fn items(&self, path: &[&str]) -> Vec<&Element> {
        self.at(path)
            .map(|e| e.children.iter().filter(|c| c.name == "item" || c.name == "member").collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_text_and_item_lists() {
        let xml = br#"<R xmlns="x"><a><item><b>1</b></item><item><b>2 &amp; 3</b></item></a><c/></R>"#;
        let root = Element::parse(xml).unwrap();
        assert_eq!(root.name, "R");
        let items = root.items(&["a"]);
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].text_at(&["b"]).as_deref(), Some("2 & 3"));
        assert!(root.child("c").is_some());
    }
}
