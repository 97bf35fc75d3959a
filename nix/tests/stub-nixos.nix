# Just enough of nixpkgs' `lib` and NixOS's `utils`, written for these tests,
# to evaluate Procurator's NixOS modules where there is no nixpkgs: options
# become plain records, the types check values but merge nothing, `mkIf`
# and `mkDefault` are resolved once. It catches mistakes in the modules' own
# code (names, escaping, the units they produce, the options' patterns); it
# proves nothing about nixpkgs itself.
let
  inherit (builtins)
    all
    attrNames
    concatStringsSep
    elem
    filter
    genList
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isPath
    isString
    listToAttrs
    mapAttrs
    match
    replaceStrings
    stringLength
    substring
    toJSON
    ;

  mkType = description: check: {
    _type = "option-type";
    inherit description check;
  };

  types = {
    str = mkType "string" isString;
    bool = mkType "boolean" isBool;
    package = mkType "package" (value: isAttrs value && value ? outPath);
    port = mkType "16 bit unsigned integer" (value: isInt value && value >= 0 && value <= 65535);
    path = mkType "path" (value: isPath value || isString value && substring 0 1 value == "/");
    strMatching =
      pattern:
      mkType "string matching the pattern ${pattern}" (value: isString value && match pattern value != null);
    enum = values: mkType "one of ${toJSON values}" (value: elem value values);
    listOf =
      element: mkType "list of ${element.description}" (value: isList value && all element.check value);
    addCheck = type: check: type // { check = value: type.check value && check value; };
    nullOr = element: mkType "null or ${element.description}" (value: value == null || element.check value);
    number = mkType "number" (value: isInt value || builtins.isFloat value);
    ints.positive = mkType "positive integer" (value: isInt value && value > 0);
    ints.between =
      lowest: highest:
      mkType "integer between ${toString lowest} and ${toString highest} (both inclusive)" (
        value: isInt value && value >= lowest && value <= highest
      );
  };

  hasPrefix = prefix: string: substring 0 (stringLength prefix) string == prefix;

  lib = {
    inherit types hasPrefix;
    inherit (builtins) concatMap concatStringsSep;
    mkOption = attrs: { _type = "option"; } // attrs;
    mkEnableOption = name: {
      _type = "option";
      type = types.bool;
      default = false;
      description = "Whether to enable ${name}.";
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkDefault = content: {
      _type = "override";
      priority = 1000;
      inherit content;
    };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    optional = condition: value: if condition then [ value ] else [ ];
    optionals = condition: list: if condition then list else [ ];
    hasInfix =
      infix: string:
      let
        last = stringLength string - stringLength infix;
      in
      last >= 0
      && builtins.any (start: substring start (stringLength infix) string == infix) (
        genList (i: i) (last + 1)
      );
    getExe' = package: program: "${package}/bin/${program}";
  };

  # systemd.service(5): in Exec* lines `%` starts a specifier and `$` a
  # variable; a double-quoted word takes C-style escapes, which JSON's are.
  utils.escapeSystemdExecArgs = concatMapStringsSep " " (
    arg: replaceStrings [ "%" "$" ] [ "%%" "$$" ] (toJSON arg)
  );
  concatMapStringsSep = separator: f: list: concatStringsSep separator (map f list);

  isOption = value: isAttrs value && value._type or null == "option";

  # The value of every option under `options`: the test's setting, checked
  # against the option's type, or the default.
  settle =
    path: options: settings:
    let
      unknown = filter (name: !(options ? ${name})) (attrNames settings);
    in
    if unknown != [ ] then
      throw "stub: ${path}: no option ${toJSON unknown}"
    else
      mapAttrs (
        name: option:
        let
          here = if path == "" then name else "${path}.${name}";
        in
        if !isOption option then
          settle here option (settings.${name} or { })
        else if settings ? ${name} then
          if option.type.check settings.${name} then
            settings.${name}
          else
            throw "The option `${here}' is not of type `${option.type.description}'."
        else if option ? default then
          option.default
        else
          throw "The option `${here}' is used but not defined."
      ) options;

  # Every option as { path, option }.
  optionList =
    path: options:
    builtins.concatMap (
      name:
      let
        here = if path == "" then name else "${path}.${name}";
      in
      if isOption options.${name} then
        [
          {
            path = here;
            option = options.${name};
          }
        ]
      else
        optionList here options.${name}
    ) (attrNames options);

  removed = {
    _type = "removed";
  };

  # mkIf and mkDefault, resolved.
  resolve =
    value:
    if isList value then
      map resolve value
    else if !isAttrs value || value ? outPath then
      value
    else if value._type or null == "if" then
      if value.condition then resolve value.content else removed
    else if value._type or null == "override" then
      resolve value.content
    else
      let
        resolved = mapAttrs (_: resolve) value;
      in
      listToAttrs (
        map (name: {
          inherit name;
          value = resolved.${name};
        }) (filter (name: resolved.${name}._type or null != "removed") (attrNames resolved))
      );
in
{
  inherit lib utils optionList;

  # Evaluates `module` with `settings` for its options (under `options`) and
  # `config` for everything else it reads. Returns its options and its
  # resolved config.
  evalModule =
    {
      module,
      settings,
      config ? { },
      pkgs ? { },
    }:
    let
      evaluated = (if isFunction module then module else import module) {
        inherit lib pkgs utils;
        config = config // settle "" evaluated.options settings;
      };
    in
    {
      inherit (evaluated) options;
      config =
        let
          resolved = resolve evaluated.config;
        in
        if resolved == removed then { } else resolved;
    };
}
