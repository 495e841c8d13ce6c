// Wallaroo node pack, ComfyUI front end: shows the answers of "Wallaroo Understand" on the node itself.
// The node returns its answers in the `text` field of its UI output; this puts them in a read-only box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "WallarooUnderstand";
const BOX = "answer";

app.registerExtension({
  name: "Wallaroo.UnderstandAnswer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const box = ComfyWidgets.STRING(this, BOX, ["STRING", { multiline: true }], app).widget;
      const area = box.element ?? box.inputEl;  // newer / older front ends
      if (area) {
        area.readOnly = true;
        area.placeholder = "The answers appear here after a run.";
      }
      // An output, not a setting: keep it out of saved workflows (serialize) and out of the prompt sent to
      // the server (options.serialize), where a changing answer would also defeat ComfyUI's result cache.
      box.serialize = false;
      if (box.options) box.options.serialize = false;
      else box.options = { serialize: false };
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const box = this.widgets?.find((w) => w.name === BOX);
      const answers = message?.text ?? [];
      if (box) box.value = answers.length > 1 ? answers.map((a, i) => `[${i + 1}] ${a}`).join("\n\n") : (answers[0] ?? "");
    };
  },
});
